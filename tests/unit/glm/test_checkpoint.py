"""Checkpoint formats load to identical models; bad checkpoints fail with clear messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.glm.checkpoint import (
    TOKENIZER_FILES,
    CheckpointError,
    DType,
    GLMConfig,
    load_config,
    load_state_dict,
    random_state_dict,
    save_checkpoint,
    write_random_checkpoint,
)
from pipeline.glm.modeling import GLMModel
from pipeline.glm.tokenization import TokenizerError, load_tokenizer
from tests.fixtures import DEMO_TOKENIZER, FIXTURE_MODEL, TINY_SHAPE, make_tiny_checkpoint

FORMATS = [  # (weights format, key prefix, shards)
    ("safetensors", "", 1), ("safetensors", "glm.", 1), ("bin", "", 1), ("bin", "glm.", 1),
    ("safetensors", "", 3), ("bin", "glm.", 3),
]


def probe_logits(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of a fixed context + <|startofpiece|> under the generation mask."""
    model = GLMModel.from_pretrained(model_dir, dtype=dtype)
    ids = torch.tensor([[1002, 5, 1003, 23, 1008, 16, 1000, 1006]])
    positions = torch.tensor([[[0, 1, 2, 3, 4, 5, 6, 2], [0, 0, 0, 0, 0, 0, 0, 1]]])
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    mask[:, :7, 7] = False
    with torch.inference_mode():
        return model(ids, positions, mask).float()


@pytest.mark.parametrize(("fmt", "prefix", "shards"), FORMATS)
def test_every_format_gives_identical_logits(tmp_path: Path, fmt: str, prefix: str,
                                             shards: int) -> None:
    reference = probe_logits(make_tiny_checkpoint(tmp_path / "ref"))
    other = make_tiny_checkpoint(tmp_path / "other", fmt=fmt, prefix=prefix, shards=shards)
    assert torch.equal(probe_logits(other), reference)


def test_fixture_bin_and_safetensors_agree(tmp_path: Path, shared_fixtures: Path) -> None:
    """The fixture ships both files: .bin without the prefix, .safetensors with `glm.`."""
    only_bin = tmp_path / "bin"
    shutil.copytree(FIXTURE_MODEL, only_bin, ignore=shutil.ignore_patterns("*.safetensors"))
    assert torch.equal(probe_logits(only_bin), probe_logits(FIXTURE_MODEL))


def test_bf16_is_close_to_fp32(tmp_path: Path) -> None:
    model_dir = make_tiny_checkpoint(tmp_path / "m")
    fp32, bf16 = probe_logits(model_dir), probe_logits(model_dir, torch.bfloat16)
    assert not torch.equal(fp32, bf16)
    assert (fp32 - bf16).abs().max() < 0.05 * fp32.abs().max()


def test_dtype_names_torch_dtypes() -> None:
    assert [DType(name).torch for name in ("float32", "bfloat16", "float16")] == [
        torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError):
        DType("float64")


def test_random_checkpoint_edit_dtype_and_tokenizer(tmp_path: Path) -> None:
    config = GLMConfig(**TINY_SHAPE)

    def edit(state: dict[str, torch.Tensor]) -> None:
        state["word_embeddings.weight"][7] = 3.0

    model_dir = write_random_checkpoint(tmp_path / "m", config, DEMO_TOKENIZER, seed=1,
                                        dtype=DType.BFLOAT16, edit=edit, fmt="bin")
    state = load_state_dict(model_dir)
    assert state["word_embeddings.weight"].dtype == torch.bfloat16
    assert bool((state["word_embeddings.weight"][7] == 3.0).all())
    unedited = random_state_dict(config, seed=1, dtype=torch.bfloat16)
    assert torch.equal(state["word_embeddings.weight"][8], unedited["word_embeddings.weight"][8])
    shipped = {p.name for p in DEMO_TOKENIZER.iterdir()} & set(TOKENIZER_FILES)
    assert shipped and all((model_dir / name).is_file() for name in shipped)
    assert load_tokenizer(model_dir).eop_id == load_tokenizer(DEMO_TOKENIZER).eop_id


def test_config_defaults_and_alias() -> None:
    config = GLMConfig.from_dict({"model_type": "glm", "num_hidden_layers": 48})
    assert config.num_layers == 48
    assert (config.hidden_size, config.num_attention_heads, config.max_sequence_length,
            config.vocab_size, config.attention_scale) == (1024, 16, 512, 30592, 1.0)


def test_fixture_config_position_table(shared_fixtures: Path) -> None:
    assert load_config(FIXTURE_MODEL).position_table_rows == 129


def write_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_not_a_glm_config(tmp_path: Path) -> None:
    model_dir = make_tiny_checkpoint(tmp_path / "m")
    write_config(model_dir, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match=r"config\.json: not a GLM config"):
        load_config(model_dir)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    config = GLMConfig(num_layers=1, hidden_size=64, num_attention_heads=1, vocab_size=1024,
                       max_sequence_length=32)
    state = random_state_dict(config)
    del state["transformer.layers.0.mlp.dense_4h_to_h.bias"]
    save_checkpoint(state, config, tmp_path)
    with pytest.raises(CheckpointError,
                       match=r"lacks 1 tensor.*'transformer\.layers\.0\.mlp\.dense_4h_to_h\.bias'"
                             r".*\(64,\)"):
        load_state_dict(tmp_path)


def test_misshaped_tensor_names_file_key_and_shapes(tmp_path: Path) -> None:
    model_dir = make_tiny_checkpoint(tmp_path / "m")
    write_config(model_dir, hidden_size=256, num_attention_heads=4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'transformer\."
                                              r"block_position_embeddings\.weight' has shape "
                                              r"\(257, 128\), expected \(257, 256\)"):
        load_state_dict(model_dir)


def test_no_weights(tmp_path: Path) -> None:
    model_dir = make_tiny_checkpoint(tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_state_dict(model_dir)


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/glm-infill-pickle-ran"),))


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    marker = Path("/tmp/glm-infill-pickle-ran")
    marker.unlink(missing_ok=True)
    model_dir = make_tiny_checkpoint(tmp_path / "m", fmt="bin")
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": _Exploit()}, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_state_dict(model_dir)
    assert not marker.exists()


def test_unknown_tokenizer_class(tmp_path: Path) -> None:
    model_dir = make_tiny_checkpoint(tmp_path / "m")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "ChatGLMTokenizer"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"unknown tokenizer_class 'ChatGLMTokenizer'"):
        load_tokenizer(model_dir)

"""Hugging Face GLM checkpoint directories: config, weights, and random checkpoints.

A checkpoint is read, never executed: `config.json` is parsed into `GLMConfig` (the hub's
field names and defaults) and weights come from safetensors or from
`torch.load(weights_only=True)`. Keys are accepted with or without the `glm.` prefix that
`save_pretrained` adds (docs/glm.md, "Checkpoints").
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where tensors are made: a Ray worker that reads configs and
    import torch  # tokenizers (reading, prompts, writing) does not pay ~1 s and ~150 MB for it

WEIGHTS_PREFIX = "glm."
LAYER_NORM_EPS = 1e-5  # hard-wired in GLM, not a config field
TOKENIZER_FILES = ("cog-pretrain.model", "vocab.json", "merges.txt", "vocab.txt",
                   "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json")


class DType(StrEnum):
    """The weight and compute dtypes GLM runs in."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.value)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names file, key and shapes."""


@dataclasses.dataclass(frozen=True)
class GLMConfig:
    """`configuration_glm.GLMConfig` with the hub defaults."""

    num_layers: int = 24
    vocab_size: int = 30592
    hidden_size: int = 1024
    num_attention_heads: int = 16
    embedding_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.1
    output_dropout_prob: float = 0.1
    max_sequence_length: int = 512
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1
    parallel_output: bool = True
    relative_encoding: bool = False
    block_position_encoding: bool = True
    output_predict: bool = False
    spell_length: int | None = None
    spell_func: str = "lstm"
    attention_scale: float = 1.0
    initializer_range: float = 0.02
    pool_token: str = "cls"
    torch_dtype: str | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_table_rows(self) -> int:
        return self.max_sequence_length + 1 if self.block_position_encoding else (
            self.max_sequence_length
        )

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> GLMConfig:
        if raw.get("model_type") != "glm" and "GLMModel" not in raw.get("architectures", []):
            raise CheckpointError(
                f"{source}: not a GLM config (model_type={raw.get('model_type')!r}, "
                f"architectures={raw.get('architectures')!r}); expected model_type 'glm'"
            )
        if "num_hidden_layers" in raw and "num_layers" not in raw:
            raw = {**raw, "num_layers": raw["num_hidden_layers"]}
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(
                f"{source}: hidden_size {config.hidden_size} is not divisible by "
                f"num_attention_heads {config.num_attention_heads}"
            )
        if config.relative_encoding:
            raise CheckpointError(f"{source}: relative_encoding=true is not supported by GLM's "
                                  "hub implementation")
        return config

    def to_dict(self) -> dict:
        return {
            "model_type": "glm",
            "architectures": ["GLMModel"],
            **dataclasses.asdict(self),
        }


def load_config(model_dir: str | Path) -> GLMConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a GLM checkpoint directory needs config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from err
    return GLMConfig.from_dict(raw, source=str(path))


def expected_shapes(config: GLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GLM checkpoint, keys without the `glm.` prefix."""
    h, v, p = config.hidden_size, config.vocab_size, config.position_table_rows
    shapes: dict[str, tuple[int, ...]] = {
        "word_embeddings.weight": (v, h),
        "transformer.position_embeddings.weight": (p, h),
        "transformer.final_layernorm.weight": (h,),
        "transformer.final_layernorm.bias": (h,),
    }
    if config.block_position_encoding:
        shapes["transformer.block_position_embeddings.weight"] = (p, h)
    for i in range(config.num_layers):
        layer = f"transformer.layers.{i}."
        shapes.update({
            layer + "input_layernorm.weight": (h,),
            layer + "input_layernorm.bias": (h,),
            layer + "attention.query_key_value.weight": (3 * h, h),
            layer + "attention.query_key_value.bias": (3 * h,),
            layer + "attention.dense.weight": (h, h),
            layer + "attention.dense.bias": (h,),
            layer + "post_attention_layernorm.weight": (h,),
            layer + "post_attention_layernorm.bias": (h,),
            layer + "mlp.dense_h_to_4h.weight": (4 * h, h),
            layer + "mlp.dense_h_to_4h.bias": (4 * h,),
            layer + "mlp.dense_4h_to_h.weight": (h, 4 * h),
            layer + "mlp.dense_4h_to_h.bias": (h,),
        })
    return shapes


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files to read, preferring safetensors; sharded sets via their index."""
    root = Path(model_dir)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (root / single).is_file():
            return [root / single]
        if (root / index).is_file():
            try:
                weight_map = json.loads((root / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{root / index}: not a weight index ({err})") from err
            shards = [root / name for name in sorted(set(weight_map.values()))]
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{root / index}: names shard {shard.name}, "
                                          "which is missing")
            return shards
    raise CheckpointError(
        f"{root}: no weights found (model.safetensors, pytorch_model.bin, or a sharded set "
        "with model.safetensors.index.json / pytorch_model.bin.index.json)"
    )


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with anything but tensors is refused here
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def iter_weights(model_dir: str | Path) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(key without `glm.` prefix, file, tensor) for every tensor in the checkpoint."""
    for path in weight_files(model_dir):
        for key, tensor in _read_weight_file(path).items():
            yield key.removeprefix(WEIGHTS_PREFIX), path, tensor


def load_state_dict(model_dir: str | Path, config: GLMConfig | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors, validated against the config's shapes; cast to `dtype` when given."""
    config = config or load_config(model_dir)
    shapes = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for key, path, tensor in iter_weights(model_dir):
        if key not in shapes:
            continue  # heads of other tasks (e.g. a classifier) are not part of GLMModel
        if tuple(tensor.shape) != shapes[key]:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                f"{shapes[key]} for this config.json"
            )
        state[key] = tensor.to(dtype) if dtype is not None else tensor
    missing = [k for k in shapes if k not in state]
    if missing:
        raise CheckpointError(
            f"{Path(model_dir)}: checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r} "
            f"(expected shape {shapes[missing[0]]})"
        )
    return state


def random_state_dict(config: GLMConfig, seed: int = 0,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Random weights in the checkpoint layout (normal(0, initializer_range), unit LayerNorms),
    float32 unless `dtype` says otherwise."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes(config).items():
        if "layernorm" in key:
            value = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        else:
            value = torch.randn(shape, generator=generator) * config.initializer_range
        state[key] = value.to(dtype or torch.float32)
    return state


def save_checkpoint(state: dict[str, torch.Tensor], config: GLMConfig, out_dir: str | Path,
                    fmt: str = "safetensors", prefix: str = "", shards: int = 1) -> Path:
    """Write `state` as a hub-layout checkpoint (config.json + weights), for demos and tests.

    fmt is "safetensors" or "bin"; `prefix` is "" (THUDM's conversion) or "glm."
    (`save_pretrained`); shards > 1 writes a sharded set with its index.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    keys = list(state)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    base = "model" if fmt == "safetensors" else "pytorch_model"
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for index, group in enumerate(groups):
        name = (f"{base}.{ext}" if shards == 1
                else f"{base}-{index + 1:05d}-of-{shards:05d}.{ext}")
        tensors = {prefix + k: state[k].contiguous() for k in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(out / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, out / name)
        weight_map.update({k: name for k in tensors})
    if shards > 1:
        (out / f"{base}.{ext}.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n"
        )
    return out


def write_random_checkpoint(out_dir: str | Path, config: GLMConfig, tokenizer_dir: str | Path,
                            seed: int = 0, dtype: DType = DType.FLOAT32,
                            edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
                            **save_options: object) -> Path:
    """A complete checkpoint directory with random weights and the tokenizer files of
    `tokenizer_dir` (demo, tests, benchmarks). `edit` may change the weights before saving."""
    state = random_state_dict(config, seed, dtype.torch)
    if edit is not None:
        edit(state)
    out = save_checkpoint(state, config, out_dir, **save_options)  # type: ignore[arg-type]
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    return out

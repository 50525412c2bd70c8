"""The job config: validation messages, `--set` overrides, the config hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, JobConfig, apply_overrides, load_config, validate
from pipeline.job import main_run

pytestmark = pytest.mark.timeout(60)

MINIMAL = {"source": {"paths": "in/"}, "output": {"path": "out/"}}


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_and_single_path(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, "source: {paths: a.jsonl}\noutput: {path: o}\n"))
    assert config.source.paths == ["a.jsonl"]
    assert config.model.engine == "torch" and config.model.path is None
    assert config.prompt.policy == "as_is" and config.prompt.multi_mask == "iterative"
    assert config.prompt.budget.max_prompt_tokens is None
    assert config.sampling.max_new_tokens == 32 and config.output.max_error_rate == 0.1
    assert config.resources.actor_range == (1, 1)


@pytest.mark.parametrize(("raw", "message"), [
    ({**MINIMAL, "prompt": {"policy": "random"}},
     "prompt.policy: must be one of 'as_is', 'template', 'span', 'sentence' or 'suffix'"),
    ({**MINIMAL, "sampling": {"max_new_token": 3}}, "sampling.max_new_token: unknown key"),
    ({**MINIMAL, "surprise": {}}, "surprise: unknown key"),
    ({"source": {"paths": "x"}}, "output: required"),
    ({**MINIMAL, "resources": {"concurrency": [4, 2]}}, "resources.concurrency: must be"),
    ({**MINIMAL, "resources": {"concurrency": "many"}}, "resources.concurrency: must be"),
    ({**MINIMAL, "prompt": {"policy": "template"}}, "needs prompt.template"),
    ({**MINIMAL, "prompt": {"budget": {"on_overflow": "drop"}}},
     "prompt.budget.on_overflow: must be one of 'error' or 'truncate'"),
    ({"source": {"paths": "x", "keep_columns": ["prompt"]}, "output": {"path": "o"}},
     "source.keep_columns: 'prompt' is an output column"),
    ({"source": {"paths": "x", "columns": ["text"], "keep_columns": ["lang"]},
      "output": {"path": "o"}}, "keep_columns ['lang'] are not in columns"),
])
def test_errors_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="invalid job config") as err:
        validate(raw)
    assert message in str(err.value)


def test_every_bad_key_is_reported() -> None:
    with pytest.raises(ConfigError) as err:
        validate({"source": {"paths": []}, "output": {"path": "o", "max_error_rate": 2},
                  "model": {"engine": "tensorflow"}})
    text = str(err.value)
    assert "source.paths" in text and "output.max_error_rate" in text
    assert "model.engine: must be one of 'torch' or 'vllm'" in text


def test_overrides_are_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "source: {paths: a}\noutput: {path: o}\n")
    config = load_config(path, ["sampling.max_new_tokens=7", "resources.concurrency=[1, 3]",
                                "model.device=null", "output.overwrite=true",
                                "source.paths=[x.jsonl, y.parquet]",
                                "prompt.template='A: {q} [MASK]'"])  # quoted: YAML
    assert config.sampling.max_new_tokens == 7
    assert config.resources.actor_range == (1, 3)
    assert config.output.overwrite is True
    assert config.source.paths == ["x.jsonl", "y.parquet"]
    assert config.prompt.template == "A: {q} [MASK]"


@pytest.mark.parametrize(("override", "message"), [
    ("sampling.temprature=0.5", "sampling.temprature: unknown key"),
    ("sampling.max_new_tokens=0", "sampling.max_new_tokens: Input should be greater"),
    ("novalue", "expected key.sub=value"),
    ("source.paths.x=1", "source.paths is not a section"),
])
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(MINIMAL, [override]))


def test_hash_ignores_how_and_where_but_not_what() -> None:
    base = validate(MINIMAL).config_hash()
    reordered = {"output": {"path": "out/"}, "source": {"paths": ["in/"]}}
    assert validate(reordered).config_hash() == base
    for same in (["output.overwrite=true"], ["output.path=elsewhere"],
                 ["resources.concurrency=[1, 4]"], ["ray.num_cpus=8"],
                 ["model.engine_options={max_num_seqs: 8}"]):
        assert validate(apply_overrides(MINIMAL, same)).config_hash() == base, same
    for different in (["sampling.max_new_tokens=5"], ["prompt.multi_mask=sequential"],
                      ["model.path=/models/glm-10b"], ["source.text_column=body"]):
        assert validate(apply_overrides(MINIMAL, different)).config_hash() != base, different


def test_yaml_round_trip(tmp_path: Path) -> None:
    import yaml

    config = validate({**MINIMAL, "resources": {"concurrency": [2, 3]}})
    path = write_yaml(tmp_path, yaml.safe_dump(config.model_dump(mode="json")))
    assert load_config(path) == config
    assert isinstance(config, JobConfig)


def test_main_run_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_yaml(tmp_path, "source: {paths: a}\noutput: {path: o}\nprompt: {policy: x}\n")
    assert main_run([str(path)]) == 2
    assert "prompt.policy: must be one of" in capsys.readouterr().err
    assert main_run([str(path), "--set", "prompt.policy=as_is", "--set", "bad"]) == 2
    assert main_run([str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read the job config" in capsys.readouterr().err
    assert main_run([str(path), "--set", "prompt.policy=as_is",
                     "--set", f"model.path={tmp_path}"]) == 2
    assert "model.path: " in capsys.readouterr().err

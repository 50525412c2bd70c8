"""The job config: validation messages, `--set` overrides, moved keys, the config hash."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipeline.cli import run_main
from pipeline.engines.base import TorchOptions, VLLMOptions
from pipeline.glm.demo import DEMO_NAME
from pipeline.glm.requests import SamplingParams, SamplingSettings
from pipeline.job.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    load_config,
    model_dir,
    model_name,
    resolve_paths,
    validate,
)

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[3]

MINIMAL = {"source": {"paths": "in/"}, "output": {"path": "out/"}}


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_and_single_path(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, "source: {paths: a.jsonl}\noutput: {path: o}\n"))
    assert config.source.paths == [str(tmp_path / "a.jsonl")]
    assert config.model.engine == "torch" and config.model.path is None
    assert config.model.dtype == "float32" and config.model.engine_options == {}
    assert config.prompt.policy == "as_is" and config.sampling.multi_mask == "iterative"
    assert config.prompt.budget.max_prompt_tokens is None
    assert config.sampling.max_new_tokens == 32 and config.output.max_error_rate == 0.1
    assert config.sampling.seed is None  # SamplingParams' default
    assert config.source.format == "auto"
    assert config.resources.actor_range == (1, 1)


def test_sampling_is_the_engines_sampling_settings() -> None:
    config = validate({**MINIMAL, "sampling": {"max_new_tokens": 5, "seed": 7,
                                               "multi_mask": "sequential"}})
    assert isinstance(config.sampling, SamplingSettings)
    params = config.sampling.params()
    assert type(params) is SamplingParams
    assert params == SamplingParams(max_new_tokens=5, seed=7)  # without multi_mask


def test_ignore_eos_is_no_job_setting() -> None:
    """Benchmarks only (`glm-infill bench`): a job that sets it is refused, not hashed."""
    with pytest.raises(ConfigError, match="sampling.ignore_eos: unknown key"):
        validate({**MINIMAL, "sampling": {"ignore_eos": True}})


def test_model_dir_and_name() -> None:
    given = validate({**MINIMAL, "model": {"path": "/models/glm-10b"}})
    assert model_dir(given.model) == "/models/glm-10b"
    assert model_name(given.model) == "/models/glm-10b"
    demo = validate(MINIMAL).model
    assert model_name(demo) == DEMO_NAME
    assert (Path(model_dir(demo)) / "config.json").is_file()  # shipped in the package


def test_target_column_only_for_pre_masked_rows() -> None:
    given = validate({**MINIMAL, "source": {**MINIMAL["source"], "target_column": "answers"}})
    assert given.source.target_column == "answers"
    with pytest.raises(ConfigError, match="target_column is for policies that remove"):
        validate({**MINIMAL, "source": {**MINIMAL["source"], "target_column": "answers"},
                  "prompt": {"policy": "span"}})
    with pytest.raises(ConfigError, match=r"target_column \['answers'\] are not in"):
        validate({**MINIMAL, "source": {**MINIMAL["source"], "target_column": "answers",
                                        "columns": ["text"]}})


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
    ({**MINIMAL, "model": {"dtype": "float64"}},
     "model.dtype: must be one of 'float32', 'bfloat16' or 'float16' (got 'float64')"),
    ({**MINIMAL, "model": {"engine": "jax"}},
     "model.engine: must be one of 'torch' or 'vllm' (got 'jax')"),
    ({**MINIMAL, "model": {"device": "tpu"}}, "model.device: must be one of 'cpu' or 'cuda'"),
    ({"source": {"paths": "x", "format": "csv"}, "output": {"path": "o"}},
     "source.format: must be one of 'auto', 'parquet' or 'jsonl' (got 'csv')"),
    ({**MINIMAL, "sampling": {"multi_mask": "both"}},
     "sampling.multi_mask: must be one of 'iterative' or 'sequential' (got 'both')"),
    ({**MINIMAL, "sampling": {"top_p": 0}}, "sampling.top_p: Input should be greater than 0"),
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


def test_overrides_are_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_yaml(tmp_path, "source: {paths: a}\noutput: {path: o}\n")
    config = load_config(path, ["sampling.max_new_tokens=7", "resources.concurrency=[1, 3]",
                                "model.device=null", "output.overwrite=true",
                                "source.paths=[x.jsonl, y.parquet]",
                                "prompt.template='A: {q} [MASK]'"])  # quoted: YAML
    assert config.sampling.max_new_tokens == 7
    assert config.resources.actor_range == (1, 3)
    assert config.output.overwrite is True
    assert config.source.paths == [str(tmp_path / "x.jsonl"), str(tmp_path / "y.parquet")]
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


def test_hash_of_a_fixed_config_is_unchanged() -> None:
    """Outputs written before stay resumable: these hashes were computed before the engines'
    sampling params gained `ignore_eos`."""
    assert validate(MINIMAL).config_hash() == (
        "ab3ead72127c5e3217dbaba166dc2201add1809c0cb4cf38698f72520a0ce79e")
    sampling = {"max_new_tokens": 8, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3,
                "multi_mask": "sequential"}
    assert validate({**MINIMAL, "sampling": sampling}).config_hash() == (
        "a4bc10cc2e3072dd55a36bd3d573930b5eb58aed989f89034c55e6602c13a3a3")


def test_hash_ignores_how_and_where_but_not_what() -> None:
    base = validate(MINIMAL).config_hash()
    reordered = {"output": {"path": "out/"}, "source": {"paths": ["in/"]}}
    assert validate(reordered).config_hash() == base
    for same in (["output.overwrite=true"], ["output.path=elsewhere"],
                 ["resources.concurrency=[1, 4]"], ["ray.num_cpus=8"],
                 ["model.engine_options={max_batch_size: 8}"], ["retry.attempts=2"],
                 ["output.progress_interval_s=5"]):
        assert validate(apply_overrides(MINIMAL, same)).config_hash() == base, same
    for different in (["sampling.max_new_tokens=5"], ["sampling.multi_mask=sequential"],
                      ["model.path=/models/glm-10b"], ["source.text_column=body"],
                      ["sampling.seed=0"], ["model.engine=vllm"],
                      ["source.unit_rows=100"]):  # units decide the part files
        assert validate(apply_overrides(MINIMAL, different)).config_hash() != base, different
    vllm = validate(apply_overrides(MINIMAL, ["model.engine=vllm"])).config_hash()
    tuned = ["model.engine=vllm", "model.engine_options={max_num_seqs: 8, kv_cache_gb: 2}"]
    assert validate(apply_overrides(MINIMAL, tuned)).config_hash() == vllm


# -- engine options: typed per engine -------------------------------------------------------
@pytest.mark.parametrize(("engine", "options", "typed"), [
    ("torch", {}, TorchOptions()),
    ("torch", {"max_batch_size": 4}, TorchOptions(max_batch_size=4)),
    ("vllm", {"max_num_seqs": 8, "kv_cache_gb": 1.5, "tensor_parallel_size": 2,
              "gpu_memory_utilization": 0.5, "max_model_len": 512,
              "attention_backend": "FLASH_ATTN"},
     VLLMOptions(max_num_seqs=8, kv_cache_gb=1.5, tensor_parallel_size=2,
                 gpu_memory_utilization=0.5, max_model_len=512, attention_backend="FLASH_ATTN")),
])
def test_engine_options_of_the_engine(engine: str, options: dict, typed: object) -> None:
    from pipeline.engines import engine_options

    config = validate({**MINIMAL, "model": {"engine": engine, "engine_options": options}})
    assert config.model.engine_options == options  # kept as written: the stage types them
    assert engine_options(config.model.engine, config.model.engine_options) == typed


@pytest.mark.parametrize(("engine", "options", "messages"), [
    ("torch", {"max_num_seqs": 8}, ["engine_options (torch).max_num_seqs: unknown key"]),
    ("torch", {"max_batch_size": 0},
     ["engine_options (torch).max_batch_size: Input should be greater than or equal to 1"]),
    ("vllm", {"max_batch_size": 4}, ["engine_options (vllm).max_batch_size: unknown key"]),
    ("vllm", {"gpu_memory_utilization": 1.5, "kv_cache_gb": "lots"},
     ["engine_options (vllm).gpu_memory_utilization: Input should be less than or equal to 1",
      "engine_options (vllm).kv_cache_gb: Input should be a valid number"]),
])
def test_engine_options_errors_name_engine_and_key(engine: str, options: dict,
                                                   messages: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        validate({**MINIMAL, "model": {"engine": engine, "engine_options": options}})
    text = str(err.value)
    assert "  model: " in text  # the section the options belong to
    for message in messages:
        assert message in text


def test_engine_options_follow_an_engine_override() -> None:
    """Options valid for vLLM fail once `--set model.engine=torch` switches the engine."""
    raw = {**MINIMAL, "model": {"engine": "vllm", "engine_options": {"max_num_seqs": 8}}}
    assert validate(raw).model.engine == "vllm"
    with pytest.raises(ConfigError, match=r"engine_options \(torch\).max_num_seqs: unknown"):
        validate(apply_overrides(raw, ["model.engine=torch"]))


# -- config version 1: prompt.multi_mask -> sampling.multi_mask ------------------------------
def test_old_multi_mask_key_still_works_and_warns() -> None:
    old = {**MINIMAL, "prompt": {"multi_mask": "sequential", "seed": 4}}
    with pytest.warns(FutureWarning, match="prompt.multi_mask is deprecated: write "
                                           "sampling.multi_mask"):
        config = validate(old)
    assert config.sampling.multi_mask == "sequential"
    assert config.prompt.seed == 4 and "multi_mask" not in config.prompt.model_dump()
    new = validate({**MINIMAL, "prompt": {"seed": 4}, "sampling": {"multi_mask": "sequential"}})
    assert config == new and config.config_hash() == new.config_hash()
    with pytest.warns(FutureWarning):  # the new key wins when both are given
        both = validate({**MINIMAL, "prompt": {"multi_mask": "sequential"},
                         "sampling": {"multi_mask": "iterative"}})
    assert both.sampling.multi_mask == "iterative"
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="sampling.multi_mask"):
        validate({**MINIMAL, "prompt": {"multi_mask": "both"}})


def test_old_multi_mask_key_from_yaml_and_overrides(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "source: {paths: a}\noutput: {path: o}\n"
                                "prompt: {multi_mask: sequential}\n")
    with pytest.warns(FutureWarning):
        assert load_config(path).sampling.multi_mask == "sequential"
    with pytest.warns(FutureWarning):
        config = load_config(write_yaml(tmp_path, "source: {paths: a}\noutput: {path: o}\n"),
                             ["prompt.multi_mask=sequential"])
    assert config.sampling.multi_mask == "sequential"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new key: no warning
        assert load_config(path.with_name("job.yaml"), ["sampling.multi_mask=sequential"])


def test_old_multi_mask_warning_is_shown_under_default_filters() -> None:
    """A FutureWarning, not a DeprecationWarning: Python shows it to CLI users by default
    (pytest's own warning filters are not in the way in a fresh interpreter)."""
    raw = {**MINIMAL, "prompt": {"multi_mask": "sequential"}}
    code = ("import json, sys; from pipeline.job.config import validate; "
            f"print(validate(json.loads({json.dumps(raw)!r})).sampling.multi_mask)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONWARNINGS": ""})
    assert done.stdout == "sequential\n"
    assert "FutureWarning: prompt.multi_mask is deprecated" in done.stderr


def test_yaml_round_trip(tmp_path: Path) -> None:
    import yaml

    config = validate({"source": {"paths": "/in/"}, "output": {"path": "/out"},
                       "resources": {"concurrency": [2, 3]}})
    path = write_yaml(tmp_path, yaml.safe_dump(config.model_dump(mode="json")))
    assert load_config(path) == config
    assert isinstance(config, JobConfig)


def test_run_main_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`glm-infill run` exits 2 on a bad config, before any Ray or model work."""
    path = write_yaml(tmp_path, "source: {paths: a}\noutput: {path: o}\nprompt: {policy: x}\n")
    assert run_main([str(path)]) == 2
    shown = capsys.readouterr()
    assert "prompt.policy: must be one of" in shown.err
    [result_line] = [line for line in shown.out.splitlines() if " result " in line]
    result = json.loads(result_line.split(" result ", 1)[1])  # what schedulers read
    assert (result["status"], result["exit_code"]) == ("failed", 2)
    assert "prompt.policy: must be one of" in result["reason"]
    assert run_main([str(path), "--set", "prompt.policy=as_is", "--set", "bad"]) == 2
    assert run_main([str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read the job config" in capsys.readouterr().err
    assert run_main([str(path), "--set", "prompt.policy=as_is",
                     "--set", f"model.path={tmp_path}"]) == 2
    assert "model.path: " in capsys.readouterr().err
    assert run_main([str(path), "--set", "prompt.policy=as_is",
                     "--set", "model.engine_options={max_num_seqs: 2}"]) == 2
    assert "engine_options (torch).max_num_seqs: unknown key" in capsys.readouterr().err


def test_relative_paths_in_a_file_are_relative_to_the_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The default job (and any config) means the same thing from any directory; paths
    typed as overrides are relative to where they were typed."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    path = write_yaml(folder, "source: {paths: [../data/a.jsonl, s3://b/x.jsonl]}\n"
                              "output: {path: out}\nmodel: {path: ../ckpt}\n")
    monkeypatch.chdir(tmp_path.parent)
    config = load_config(path)
    assert config.source.paths == [str(tmp_path / "data" / "a.jsonl"), "s3://b/x.jsonl"]
    assert (config.output.path, config.model.path) == (str(folder / "out"),
                                                       str(tmp_path / "ckpt"))
    monkeypatch.chdir(tmp_path)
    typed = load_config(path, ["output.path=here/out", "source.paths=/abs/in.jsonl"])
    assert (typed.output.path, typed.source.paths) == (str(tmp_path / "here" / "out"),
                                                       ["/abs/in.jsonl"])


def test_relative_paths_of_a_config_in_object_storage_stay_in_its_prefix() -> None:
    raw = {"source": {"paths": "../data/*.jsonl"}, "output": {"path": "out"},
           "model": {"path": None}}
    resolved = resolve_paths(raw, "s3://bucket/jobs")
    assert resolved["source"]["paths"] == "s3://bucket/data/*.jsonl"
    assert resolved["output"]["path"] == "s3://bucket/jobs/out"
    assert resolved["model"]["path"] is None and raw["output"]["path"] == "out"


def test_sdk_sections_resolve_against_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.job.runner import InfillJob

    monkeypatch.chdir(tmp_path)
    job = InfillJob.from_kwargs(source={"paths": "in"}, output={"path": "out"})
    assert (job.config.source.paths, job.config.output.path) == ([str(tmp_path / "in")],
                                                                 str(tmp_path / "out"))


def test_a_dashboard_url_as_ray_address_is_explained(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """RAY_ADDRESS=http://host:8265 (the form of Ray's job docs) names the Jobs API, not a
    cluster a driver can join: one line saying what to do, exit 2, before Ray starts."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    path = write_yaml(tmp_path, "source: {paths: a.jsonl}\noutput: {path: o}\n")
    assert run_main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Ray dashboard (Jobs API) address" in err
    assert "glm-infill submit --address http://127.0.0.1:8265" in err

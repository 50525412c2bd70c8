"""Preflight checks (pipeline/job/checks.py): each mistake that would otherwise fail every row,
or fail an actor after a traceback, is one ConfigError naming the key, before any engine."""

from __future__ import annotations

import gzip
import json
import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.job import checks
from pipeline.job.config import ConfigError, JobConfig, validate
from pipeline.job.runner import InfillJob
from tests.fixtures import make_tiny_checkpoint

pytestmark = pytest.mark.timeout(120)

RECORDS = [{"id": f"r{i}", "text": f"Row {i} has a [MASK] here.", "lang": "en"}
           for i in range(5)]


def job(tmp_path: Path, model: Path | None = None, paths: list[str] | None = None,
        **sections: dict[str, Any]) -> JobConfig:
    raw: dict[str, Any] = {"source": {"paths": paths or [str(tmp_path / "in")]},
                           "output": {"path": str(tmp_path / "out")},
                           "model": {"path": str(model) if model else None}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate(raw)


def write(path: Path, records: list[dict[str, Any]]) -> str:
    """`records` as Parquet, JSONL or gzipped JSONL, by the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    else:
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return str(path)


def problem(config: JobConfig, files: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        checks.check_columns(config, files)
    return str(err.value)


# -- token budget ---------------------------------------------------------------------------
def test_max_new_tokens_over_the_models_positions(tmp_path: Path, small_model: Path) -> None:
    config = job(tmp_path, small_model, sampling={"max_new_tokens": 1_000_000})
    with pytest.raises(ConfigError, match=r"^sampling.max_new_tokens: 1000000 exceeds the "
                                          r"model's max_sequence_length 128 .*at most 128$"):
        checks.check_model(config, print)
    assert checks.check_model(job(tmp_path, small_model, sampling={"max_new_tokens": 128}),
                              print) is not None


def test_a_prompt_budget_without_room_for_any_prompt(tmp_path: Path, small_model: Path) -> None:
    """The shortest prompt, `[CLS] [MASK] <|endoftext|>`, is 3 tokens."""
    tight = job(tmp_path, small_model, prompt={"budget": {"max_prompt_tokens": 2}})
    with pytest.raises(ConfigError, match="^prompt.budget.max_prompt_tokens: leaves no room "
                                          "for any prompt .*prompt is 3 tokens, the budget is 2"):
        checks.check_model(tight, print)
    checks.check_model(job(tmp_path, small_model, prompt={"budget": {"max_prompt_tokens": 3}}),
                       print)


def test_a_template_longer_than_the_budget(tmp_path: Path, small_model: Path) -> None:
    prompt = {"policy": "template", "template": "one two three four five {q} [MASK]",
              "budget": {"max_prompt_tokens": 5}}
    with pytest.raises(ConfigError, match="^prompt.template: even with every column empty"):
        checks.check_model(job(tmp_path, small_model, prompt=prompt), print)
    truncated = {**prompt, "budget": {"max_prompt_tokens": 5, "on_overflow": "truncate"}}
    checks.check_model(job(tmp_path, small_model, prompt=truncated), print)  # context drops


# -- model ----------------------------------------------------------------------------------
def test_model_summary_without_loading_weights(tmp_path: Path, small_model: Path) -> None:
    from pipeline.glm.checkpoint import expected_shapes

    summary = checks.check_model(job(tmp_path, small_model), print)
    assert summary is not None and summary.path == str(small_model)
    assert summary.config.max_sequence_length == 128 and summary.config.hidden_size == 128
    assert (summary.tokenizer, summary.tokenizer_size) == ("GLMChineseTokenizer", 1010)
    shapes = expected_shapes(summary.config)
    assert summary.weights.tensors == len(shapes) and summary.weights.dtypes == ["F32"]
    assert summary.weights.parameters == sum(math.prod(s) for s in shapes.values())
    assert summary.weights.files == ["model.safetensors"]


def test_a_tokenizer_without_the_answer_tokens_is_a_config_error(tmp_path: Path) -> None:
    """A checkpoint whose tokenizer has no `<|startofpiece|>` loads (as upstream's does), but
    no prompt can be answered without it: one line before the job starts, not an engine's
    traceback."""
    from tests.unit.glm.test_tokenizers import GLM_SPECIALS, write_gpt2_tokenizer

    model = make_tiny_checkpoint(tmp_path / "model")
    for name in ("cog-pretrain.model", "tokenizer_config.json", "added_tokens.json",
                 "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    write_gpt2_tokenizer(model, specials={**GLM_SPECIALS,
                                          "additional_special_tokens": ["[sMASK]"]})
    with pytest.raises(ConfigError, match=r"model.path: .*'<\|startofpiece\|>' has no id"):
        checks.check_model(job(tmp_path, model), print)


@pytest.mark.parametrize(("settings", "message"), [
    ({"device": "cuda"}, "model.device: cuda, but torch finds no CUDA device"),
    ({"engine": "vllm", "engine_options": {"kv_cache_gb": 100000}},
     r"model.engine_options.kv_cache_gb: a KV cache of 100000.0 GiB is more than")])
def test_engine_settings_this_machine_refuses(tmp_path: Path, small_model: Path,
                                              settings: dict[str, Any], message: str) -> None:
    """On a local cluster the engines run here (`check_model` then calls this): settings they
    would refuse at start (after Ray's actor traceback) are one line before the job starts.
    (This machine has no GPU.)"""
    config = job(tmp_path, small_model)
    config.model = config.model.model_validate({**config.model.model_dump(), **settings})
    with pytest.raises(ConfigError, match=message):
        checks.check_engine_settings(config)


def test_missing_model_path_on_a_local_cluster_fails_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def no_cluster(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a local check must not start Ray")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever earlier tests left
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(ConfigError, match=f"^model.path: {tmp_path}/nope does not exist; "):
        checks.check_model(job(tmp_path, tmp_path / "nope"), print)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda state: state.pop("word_embeddings.weight"),
     "checkpoint lacks 1 tensor.s., first 'word_embeddings.weight'"),
    (lambda state: state.update({"transformer.final_layernorm.bias": state[
        "transformer.final_layernorm.bias"][:3]}),
     "tensor 'transformer.final_layernorm.bias' has shape .3,., expected .128,."),
])
def test_weights_that_would_not_load(tmp_path: Path, edit: Any, message: str) -> None:
    model = make_tiny_checkpoint(tmp_path / "model", edit=edit)
    with pytest.raises(ConfigError, match=f"^model.path: {model}: {message}"):
        checks.check_model(job(tmp_path, model), print)


def test_not_a_checkpoint_and_bin_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="^model.path: .*config.json: missing"):
        checks.check_model(job(tmp_path, tmp_path / "empty"), print)
    model = make_tiny_checkpoint(tmp_path / "bin", fmt="bin")
    summary = checks.check_model(job(tmp_path, model), print)
    assert summary is not None and summary.weights.files == ["pytorch_model.bin"]
    assert summary.weights.tensors is None  # .bin shapes: checked when an engine loads them


class NotHere(type(Path())):
    """A path as the driver of a remote cluster sees a model only its nodes have."""

    def exists(self, **_: Any) -> bool:
        return False


def test_missing_model_path_on_a_cluster_is_checked_there(
        tmp_path: Path, small_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path this machine lacks is looked at on a node the engines can use: one small task,
    one line, in seconds (here a local Ray, already started, stands for the cluster)."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = not ray.is_initialized()  # the e2e tests' cluster, when they ran before
    if started:
        ray.init(num_cpus=1, include_dashboard=False)
    try:
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"^model.path: /nonexistent/glm does not exist "
                                              r"on Ray node [0-9a-f]{12};"):
            checks.check_model(job(tmp_path, Path("/nonexistent/glm")), print)
        assert time.monotonic() - start < 60
        monkeypatch.setattr(checks, "Path", NotHere)  # the model is only on the node
        summary = checks.check_model(job(tmp_path, small_model), print)
        assert summary is not None and summary.config.max_sequence_length == 128
        with pytest.raises(ConfigError, match="^sampling.max_new_tokens: 129 exceeds"):
            checks.check_model(job(tmp_path, small_model, sampling={"max_new_tokens": 129}),
                               print)
    finally:
        if started:
            ray.shutdown()


# -- source columns -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["in.parquet", "in.jsonl", "in.jsonl.gz"])
def test_columns_the_config_names_must_be_in_the_first_file(tmp_path: Path, name: str) -> None:
    files = [write(tmp_path / name, RECORDS)]
    checks.check_columns(job(tmp_path, source={"id_column": "id", "keep_columns": ["lang"]}),
                         files)
    where = files[0] if name.endswith("parquet") else f"the first 5 lines of {files[0]}"
    text = problem(job(tmp_path, source={"text_column": "body"}), files)
    assert text == (f"source.text_column: 'body' not found in {where} (columns there: "
                    f"{', '.join(checks.source_columns(files, job(tmp_path)).names)}); "
                    "set it to the column that holds the text")
    assert problem(job(tmp_path, source={"id_column": "uid"}), files).startswith(
        "source.id_column: 'uid' not found")
    assert problem(job(tmp_path, source={"keep_columns": ["lang", "region"]}), files).startswith(
        "source.keep_columns: 'region' not found")
    template = {"policy": "template", "template": "{text} {question} [MASK]"}
    assert problem(job(tmp_path, prompt=template), files).startswith(
        "prompt.template: 'question' not found")


def test_every_problem_is_one_line(tmp_path: Path) -> None:
    files = [write(tmp_path / "in.parquet", RECORDS)]
    config = job(tmp_path, source={"text_column": "body", "id_column": "uid",
                                   "keep_columns": ["x", "y"]})
    lines = problem(config, files).splitlines()
    assert [line.split(":")[0] for line in lines] == ["source.text_column", "source.id_column",
                                                      "source.keep_columns"]
    assert "'x', 'y' not found" in lines[2]


def test_template_columns_must_be_read_and_the_template_valid(tmp_path: Path) -> None:
    files = [write(tmp_path / "in.jsonl", [{**r, "q": "why?"} for r in RECORDS])]
    template = {"policy": "template", "template": "Q: {q} A: [MASK]"}
    checks.check_columns(job(tmp_path, prompt=template), files)
    text = problem(job(tmp_path, prompt=template, source={"columns": ["text"]}), files)
    assert text == "prompt.template: 'q' not in source.columns ['text']; add them there"
    broken = {"policy": "template", "template": "Q: {q A: [MASK]"}
    assert problem(job(tmp_path, prompt=broken), files).startswith(
        "prompt.template: not a valid format string")


def test_only_the_first_readable_file_counts(tmp_path: Path) -> None:
    """A later file without a column keeps today's per-row errors; an unparsable first file
    is the run's to report (unreadable), so the next one is looked at."""
    broken = tmp_path / "in" / "a.parquet"
    broken.parent.mkdir()
    broken.write_bytes(b"not parquet")
    files = [str(broken), write(tmp_path / "in" / "b.jsonl", RECORDS),
             write(tmp_path / "in" / "c.jsonl", [{"text": "no lang [MASK]"}])]
    config = job(tmp_path, source={"keep_columns": ["lang"]})
    assert checks.source_columns(files, config).uri == files[1]
    checks.check_columns(config, files)


def test_run_fails_before_writing_anything(tmp_path: Path, small_model: Path) -> None:
    write(tmp_path / "in" / "a.jsonl", RECORDS)
    for sections, message in (({"source": {"text_column": "body"}}, "source.text_column"),
                              ({"sampling": {"max_new_tokens": 1_000_000}},
                               "sampling.max_new_tokens")):
        with pytest.raises(ConfigError, match=f"^{message}: "):
            InfillJob(job(tmp_path, small_model, **sections)).run()
        assert not (tmp_path / "out").exists()


# -- files and sample prompts (validate) ----------------------------------------------------
def test_describe_files(tmp_path: Path) -> None:
    source = job(tmp_path, source={"unit_rows": 4, "unit_bytes": 100}).source
    parquet = checks.describe_file(write(tmp_path / "a.parquet", RECORDS), source)
    assert (parquet.format, parquet.units, parquet.rows, parquet.rows_estimated) == (
        "parquet", 2, 5, False)  # row groups of 2: [2, 2] and [1]
    jsonl = checks.describe_file(write(tmp_path / "b.jsonl", RECORDS), source)
    assert jsonl.units == -(-jsonl.bytes // 100) and jsonl.rows_estimated
    stream = checks.describe_file(write(tmp_path / "c.jsonl.gz", RECORDS), source)
    assert (stream.format, stream.units, stream.rows_estimated) == ("jsonl, compressed", None,
                                                                    True)
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    assert checks.describe_file(str(tmp_path / "d.parquet"), source).unreadable


@pytest.mark.parametrize("name", ["in.parquet", "in.jsonl"])
def test_sample_prompts_come_from_the_prompt_stage(tmp_path: Path, small_model: Path,
                                                   name: str) -> None:
    records = [*RECORDS[:2], {"id": "r2", "text": "nothing to fill", "lang": "en"}, *RECORDS[3:]]
    files = [write(tmp_path / "in" / name, records)]
    config = job(tmp_path, small_model, source={"id_column": "id"})
    rows = checks.sample_rows(files[0], files, config, 3)
    assert [row["id"] for row in rows] == ["r0", "r1", "r2"]
    prompts = checks.build_sample_prompts(config, rows)
    assert [p.prompt for p in prompts[:2]] == [r["text"] for r in RECORDS[:2]]
    assert prompts[0].budget_action == "fits" and 0 < prompts[0].prompt_tokens <= 128
    assert (prompts[2].error_type, prompts[2].prompt_tokens) == ("no_mask", None)

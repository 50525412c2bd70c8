"""The job's stages as plain classes, without Ray: read -> PromptStage -> GenerateStage (a real
torch engine over a small random checkpoint) -> write.

Ray Data builds each stage with `fn_constructor_kwargs` (the config as JSON and the demo
checkpoint's directory) and calls it with one unit's block; these tests do the same by hand, so
every path of a stage runs in a second and without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import pipeline.job.generate as generate
import pipeline.job.prompts as prompts
from pipeline.engines import engine_options
from pipeline.engines.torch_engine import TorchEngine
from pipeline.glm.procedures import Fill, FillResult
from pipeline.glm.requests import SamplingParams, SpanRequest, SpanResult
from pipeline.job.config import JobConfig, validate
from pipeline.job.generate import GenerateStage
from pipeline.job.plan import plan_units
from pipeline.job.prompts import PromptStage
from pipeline.job.read import UnitReader
from pipeline.job.rows import WORK_SCHEMA
from pipeline.job.scoring import SCORE_COLUMNS
from pipeline.job.storage import OutputStore
from pipeline.job.write import write_units
from tests.fixtures import spliced

pytestmark = pytest.mark.timeout(120)

GOOD = ["Line one has a [MASK] in it.", "Two [MASK] and [sMASK] here.", "[gMASK]",
        "Tail [MASK] text.", "The [MASK] sat on the [MASK].", "Say [sMASK] again."]
LONG = " ".join(["word"] * 300) + " [MASK]"  # over the small model's 128 positions
PROMPT_ERRORS = {"nothing to fill": "no_mask", LONG: "too_long"}


def job_config(checkpoint: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A JobConfig as the runner hands it to the stages: `model_dump(mode="json")`."""
    raw: dict[str, Any] = {"source": {"paths": "in"}, "output": {"path": "out"},
                           "model": {"path": str(checkpoint)},
                           "sampling": {"max_new_tokens": 3}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate(raw).model_dump(mode="json")


def read_block(tmp_path: Path, texts: list[str], bad_lines: int = 1) -> pa.Table:
    """The read task's block for a one-unit JSONL file: `texts`, then `bad_lines` broken
    lines."""
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": t}).encode() for t in texts] + [b"{broken"] * bad_lines
    path.write_bytes(b"\n".join(lines) + b"\n")
    job = job_config(Path("unused"), source={"paths": [str(path)]},
                     output={"path": str(tmp_path / "out")})
    [unit] = plan_units([str(path)], JobConfig.model_validate(job).source, set(), set()).units
    [block] = UnitReader(unit, job, "h" * 64)()
    return block


def by_text(block: pa.Table) -> dict[str | None, dict[str, Any]]:
    return {json.loads(row["record"]).get("text"): row for row in block.to_pylist()}


def assert_filled(row: dict[str, Any]) -> None:
    assert row["error_type"] is None and row["error_message"] is None, row
    assert row["fills"] and all(f["finish_reason"] in ("stop", "length") for f in row["fills"])
    assert row["output_text"] is not None and "MASK]" not in row["output_text"]
    assert row["prompt_tokens"] == len(row["prompt_token_ids"]) > 0
    assert row["output_tokens"] == sum(len(f["token_ids"]) for f in row["fills"])


def without_worker(row: dict[str, Any]) -> dict[str, Any]:
    """A row without the stamp of the actor that generated it (`generated_by`)."""
    return {k: v for k, v in row.items() if k != "generated_by"}


def filled_columns(row: dict[str, Any]) -> tuple:
    return tuple(row[name] for name in ("prompt_token_ids", "fills", "output_text",
                                        "prompt_tokens", "output_tokens", "error_type"))


def reference(engine: TorchEngine, row: dict[str, Any], params: SamplingParams) -> tuple:
    """What one row becomes when it is filled on its own (`fill` with one text)."""
    result = TorchEngine.fill(engine, [row["prompt"]], params=params)[0]
    fills = [dict(mask=f.mask, text=f.text, token_ids=f.token_ids,
                  finish_reason=f.finish_reason) for f in result.fills]
    return (result.prompt_token_ids, fills, result.output_text, len(result.prompt_token_ids),
            sum(len(f["token_ids"]) for f in fills), None)


@pytest.fixture(scope="module")
def config(small_model: Path) -> dict[str, Any]:
    return job_config(small_model)


@pytest.fixture(scope="module")
def prompted(config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """Six good rows, two the prompt stage rejects and one the read stage rejected."""
    block = read_block(tmp_path_factory.mktemp("in"), [*GOOD, *PROMPT_ERRORS])
    return PromptStage(config)(block)


@pytest.fixture(scope="module")
def torch_stage(config: dict[str, Any]) -> GenerateStage:
    return GenerateStage(config)


# -- prompt -------------------------------------------------------------------------------
def test_prompt_stage_builds_prompts(prompted: pa.Table) -> None:
    assert prompted.schema == WORK_SCHEMA
    rows = by_text(prompted)
    for text in GOOD:
        row = rows[text]
        assert (row["prompt"], row["budget_action"], row["target"]) == (text, "fits", None)
        assert row["error_type"] is None and row["fills"] is None  # generate's columns: unset
    for text, error_type in PROMPT_ERRORS.items():
        assert (rows[text]["error_type"], rows[text]["budget_action"]) == (error_type, "error")
        assert rows[text]["error_message"]
    broken = rows[None]  # the read stage's error row passes untouched
    assert broken["error_type"] == "invalid_json" and broken["prompt"] is None
    assert broken["budget_action"] is None


def test_prompt_stage_applies_the_policy(small_model: Path, tmp_path: Path) -> None:
    stage = PromptStage(job_config(small_model, prompt={"policy": "suffix"}))
    row = stage(read_block(tmp_path, ["one two three four five six"], 0)).to_pylist()[0]
    assert (row["prompt"], row["target"]) == ("one two three [gMASK]", ["four five six"])


def test_a_policy_exception_becomes_prompt_error(small_model: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a policy fails its row, not the block (Ray Data would fail the whole job)."""
    real = prompts.build_prompt
    block = read_block(tmp_path, GOOD)
    stage = PromptStage(job_config(small_model))
    expected = by_text(stage(block))

    def flaky(record: dict, *args: Any, **kwargs: Any):
        if record["text"] == GOOD[1]:
            raise KeyError("policy bug")
        return real(record, *args, **kwargs)

    monkeypatch.setattr(prompts, "build_prompt", flaky)
    rows = by_text(stage(block))
    assert (rows[GOOD[1]]["error_type"], rows[GOOD[1]]["error_message"]) == (
        "prompt_error", "KeyError: 'policy bug'")
    assert rows[GOOD[1]]["prompt"] is None
    assert {t: r for t, r in rows.items() if t != GOOD[1]} == {
        t: r for t, r in expected.items() if t != GOOD[1]}


# -- generate -----------------------------------------------------------------------------
def test_generate_stage_uses_the_config(small_model: Path) -> None:
    stage = GenerateStage(job_config(small_model, model={"engine_options": {"max_batch_size": 2}},
                                     sampling={"multi_mask": "sequential", "seed": 5},
                                     resources={"batch_size": 3}))
    assert isinstance(stage.engine, TorchEngine) and not stage.engine.continuous_batching
    assert stage.engine.max_batch_size == 2 and stage.batch_size == 3
    assert stage.multi_mask == "sequential"
    assert stage.params == SamplingParams(max_new_tokens=3, seed=5)


def test_generate_stage_loads_its_engine_on_the_engine_thread(
        small_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread that fills also loads (GNU OpenMP keeps a thread team per computing thread),
    and a vLLM engine core in the actor lets the OS place its threads unless the user said
    otherwise."""
    loaded_on = []

    def make_engine(*args: Any) -> Any:
        loaded_on.append(threading.current_thread().name)
        return real_make_engine(*args)

    real_make_engine = generate.make_engine
    monkeypatch.setattr(generate, "make_engine", make_engine)
    monkeypatch.delenv(generate.VLLM_CPU_BIND, raising=False)
    stage = GenerateStage(job_config(small_model))
    fill_thread = stage._engine_thread.submit(lambda: threading.current_thread().name).result()
    assert loaded_on == [fill_thread] and fill_thread.startswith("engine")
    assert os.environ[generate.VLLM_CPU_BIND] == "nobind"
    monkeypatch.setenv(generate.VLLM_CPU_BIND, "0-1")
    GenerateStage(job_config(small_model))
    assert os.environ[generate.VLLM_CPU_BIND] == "0-1"  # the user's binding is kept


def test_generate_stage_fills_a_block(torch_stage: GenerateStage, prompted: pa.Table) -> None:
    out = asyncio.run(torch_stage(prompted))
    assert out.schema == WORK_SCHEMA
    assert out.column("id").to_pylist() == prompted.column("id").to_pylist()  # order kept
    before, after = by_text(prompted), by_text(out)
    for text in GOOD:
        assert_filled(after[text])
        assert after[text]["prompt"] == text
        assert after[text]["output_text"] == spliced(text, [f["text"]
                                                            for f in after[text]["fills"]])
        assert [after[text][name] for name in SCORE_COLUMNS] == [None] * 4  # no target
        assert after[text]["unit_rows"] == before[text]["unit_rows"]  # the unit travels along
    for text in [*PROMPT_ERRORS, None]:  # error rows pass through untouched
        assert without_worker(after[text]) == without_worker(before[text])
    assert {row["generated_by"] for row in after.values()} == {torch_stage.worker}


def test_generate_stage_scores_rows_with_a_target(small_model: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    job = job_config(small_model, prompt={"policy": "suffix"})
    texts = ["one two three four five six", "seven eight nine ten"]
    block = PromptStage(job)(read_block(tmp_path, texts))
    prompts = {text: row["prompt"] for text, row in by_text(block).items()}
    answers = {prompts[texts[0]]: " four  five six\n",  # exact once normalised
               prompts[texts[1]]: "nine eleven"}  # one word of the two right
    stage = GenerateStage(job)

    def fill(prompts: list[str], *args: Any) -> list[FillResult]:
        return [FillResult(p, [1], [Fill("[gMASK]", answers[p], [5], "stop")], p)
                for p in prompts]

    monkeypatch.setattr(stage.engine, "fill", fill)
    rows = by_text(asyncio.run(stage(block)))
    assert [rows[texts[0]][name] for name in SCORE_COLUMNS] == [[True], [1.0], True, 1.0]
    assert [rows[texts[1]][name] for name in SCORE_COLUMNS] == [[False], [0.5], False, 0.5]
    assert [rows[None][name] for name in SCORE_COLUMNS] == [None] * 4  # the error row


def test_fill_gets_batch_size_rows_at_a_time(small_model: Path, prompted: pa.Table,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    stage = GenerateStage(job_config(small_model, resources={"batch_size": 4}))
    real, calls = stage.engine.fill, []

    def fill(texts, *args, **kwargs):
        calls.append(list(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(stage.engine, "fill", fill)
    rows = by_text(asyncio.run(stage(prompted)))
    # similar token counts together: less padding
    by_length = sorted(GOOD, key=lambda text: len(stage.engine.tokenizer.tokenize_ids(text)))
    assert calls == [by_length[:4], by_length[4:]]  # only rows without an error reach it
    for text in GOOD:
        assert_filled(rows[text])


def test_a_rows_own_problem_is_that_rows_error(small_model: Path, prompted: pa.Table) -> None:
    """A request the engine refuses (answers longer than the model's positions) is an error
    row, not a failed unit."""
    stage = GenerateStage(job_config(small_model, sampling={"max_new_tokens": 200}))
    rows = by_text(asyncio.run(stage(prompted)))
    for text in GOOD:
        assert rows[text]["error_type"] == "too_long", rows[text]
        assert "max_sequence_length 128" in rows[text]["error_message"]
        assert rows[text]["output_text"] is None and rows[text]["prompt"] == text


def test_an_engine_fault_fails_the_call(torch_stage: GenerateStage, prompted: pa.Table,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything else the engine raises is a fault of the machinery, not of a row: it
    propagates, so the unit is not committed and Ray retries the call (no row is marked)."""
    def broken(texts, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(torch_stage.engine, "fill", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        asyncio.run(torch_stage(prompted))


def test_rows_sample_with_seeds_of_their_own(small_model: Path, prompted: pa.Table) -> None:
    """With `sampling.seed`, a row's sample depends on the seed and on the row (source file,
    row index), not on the batch it is decoded in or on the other rows."""
    sampling = {"temperature": 1.0, "seed": 3, "max_new_tokens": 4}

    def outputs(block: pa.Table, batch_size: int, seed: int = 3) -> dict:
        stage = GenerateStage(job_config(small_model, sampling={**sampling, "seed": seed},
                                         resources={"batch_size": batch_size}))
        return {text: filled_columns(row) for text, row in by_text(asyncio.run(stage(block)))
                .items() if text in GOOD}

    together = outputs(prompted, batch_size=6)
    assert outputs(prompted.take(list(range(prompted.num_rows))[::-1]), batch_size=1) == together
    assert outputs(prompted, batch_size=6, seed=4) != together
    spans = [tuple(f["token_ids"]) for fills in together.values() for f in fills[1]]
    assert len(set(spans)) > 1  # rows do not share one random stream


# -- generate, continuous batching --------------------------------------------------------
class CountingEngine(TorchEngine):
    """The real torch engine, declared continuous-batching, counting concurrent requests."""

    continuous_batching = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.active = self.peak = self.calls = 0
        self.fail_text: str | None = None

    async def agenerate(self, request: SpanRequest) -> SpanResult:
        self.active += 1
        self.calls += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.02)  # let every admitted row reach the engine
            return await super().agenerate(request)
        finally:
            self.active -= 1

    async def afill(self, text: str, *args: Any, **kwargs: Any):
        if text == self.fail_text:
            raise RuntimeError("engine died")
        return await super().afill(text, *args, **kwargs)

    def fill(self, *args: Any, **kwargs: Any):
        raise AssertionError("a continuous-batching engine gets rows through afill")


@pytest.fixture
def counting_stage(small_model: Path, monkeypatch: pytest.MonkeyPatch):
    def make(max_in_flight: int) -> GenerateStage:
        def fake_make_engine(name, model_dir, dtype, device, options):
            assert (name, model_dir) == ("torch", str(small_model))
            return CountingEngine(model_dir, dtype, device, engine_options(name, options))

        monkeypatch.setattr(generate, "make_engine", fake_make_engine)
        return GenerateStage(job_config(small_model,
                                        resources={"max_in_flight": max_in_flight}))

    return make


@pytest.mark.parametrize(("max_in_flight", "peak"), [(2, 2), (16, len(GOOD))])
def test_max_in_flight_bounds_the_rows_in_the_engine(counting_stage, prompted: pa.Table,
                                                     max_in_flight: int, peak: int) -> None:
    stage = counting_stage(max_in_flight)
    engine: CountingEngine = stage.engine
    out = asyncio.run(stage(prompted))
    assert engine.peak == peak and engine.active == 0
    assert engine.calls >= len(GOOD)  # one request per blank: some rows have two
    before, rows = by_text(prompted), by_text(out)
    for text in GOOD:
        assert_filled(rows[text])
        assert filled_columns(rows[text]) == reference(engine, rows[text], stage.params)
    for text in [*PROMPT_ERRORS, None]:
        assert without_worker(rows[text]) == without_worker(before[text])


def test_an_engine_fault_in_afill_fails_the_call(counting_stage, prompted: pa.Table) -> None:
    stage = counting_stage(2)
    stage.engine.fail_text = GOOD[0]
    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(stage(prompted))


# -- the stages chained -------------------------------------------------------------------
def test_read_prompt_generate_write_without_ray(small_model: Path, tmp_path: Path) -> None:
    """One unit through every stage, as Ray Data would pass it along: one part committed,
    every input row in it exactly once."""
    block = read_block(tmp_path, [*GOOD, *PROMPT_ERRORS])
    job = job_config(small_model, output={"path": str(tmp_path / "out")})
    block = asyncio.run(GenerateStage(job)(PromptStage(job)(block)))
    [record] = write_units(block, job, "h" * 64).to_pylist()
    assert (record["rows"], record["ok"], record["error"]) == (9, 6, 3)
    assert json.loads(record["error_types"]) == {"invalid_json": 1, "no_mask": 1,
                                                 "too_long": 1}
    table = OutputStore(str(tmp_path / "out"), JobConfig.model_validate(job).source.storage
                        ).read_part(record["part"])
    assert table.column("row_index").to_pylist() == list(range(9))
    assert table.column("model").unique().to_pylist() == [str(small_model)]


# Reads, builds the prompts of and writes one unit in a fresh process, then prints which of
# the engines' libraries that process imported.
STAGES_BUT_GENERATE = """
import json, sys
import pyarrow as pa
from pipeline.job.config import JobConfig
from pipeline.job.plan import plan_units
from pipeline.job.prompts import PromptStage
from pipeline.job.read import UnitReader
from pipeline.job.write import write_units

job = json.loads(sys.argv[1])
config = JobConfig.model_validate(job)
[unit] = plan_units(config.source.paths, config.source, set(), set()).units
[block] = UnitReader(unit, job, "h" * 64)()
assert PromptStage(job)(block).num_rows == 7
with pa.memory_map(sys.argv[2]) as generated:
    assert write_units(pa.ipc.open_file(generated).read_all(), job, "h" * 64).num_rows == 1
print(json.dumps(sorted(name for name in ("torch", "vllm") if name in sys.modules)))
"""


def test_only_the_generate_stage_imports_torch(small_model: Path, tmp_path: Path,
                                               torch_stage: GenerateStage) -> None:
    """Ray runs reading, prompts and writing in processes of their own: without torch they
    start ~1 s sooner on a busy node and take ~150 MB less each."""
    block = read_block(tmp_path, GOOD)
    job = job_config(small_model, source={"paths": [str(tmp_path / "in.jsonl")]},
                     output={"path": str(tmp_path / "out")})
    generated = asyncio.run(torch_stage(PromptStage(job)(block)))
    with pa.OSFile(str(tmp_path / "generated.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, generated.schema) as writer:
        writer.write_table(generated)
    done = subprocess.run([sys.executable, "-c", STAGES_BUT_GENERATE, json.dumps(job),
                           str(tmp_path / "generated.arrow")], capture_output=True, text=True,
                          timeout=100, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == []

"""Whole jobs on a real local Ray cluster: outputs, resume after SIGKILL, S3, error threshold.

Every job here runs on the session's one Ray head (tests/e2e/conftest.py): in this process
(`ray_cluster`), as a driver in a subprocess (`ray_env`), or through `ray job submit`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray.data
import yaml
from ray.data.context import DataContext

from pipeline.cli import run_main
from pipeline.job.backpressure import MIN_BUDGET
from pipeline.job.runner import InfillJob, JobFailed
from pipeline.job.storage import MANIFEST, OutputError
from tests.e2e.ray_head import VLLM_CPU_ENV, RayHead, head_env
from tests.e2e.s3 import BUCKET, REGION, SeaweedS3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]

BAD_LINES = [(b"{broken", "invalid_json"), (b'{"text": "\xff\xfe [MASK]"}', "invalid_utf8"),
             (b'{"text": 7}', "wrong_type"), (b'{"text": null}', "missing_text"),
             (b'{"text": ""}', "empty_text"), (b'{"text": "nothing to fill"}', "no_mask")]


def jsonl(texts: list[str]) -> bytes:
    return b"".join(json.dumps({"text": t, "lang": "en"}).encode() + b"\n" for t in texts)


def write_corpus(root: Path) -> dict[str, str | None]:
    """Three files (JSONL, JSONL.gz, Parquet); returns the expected error_type per row id."""
    root.mkdir(parents=True, exist_ok=True)
    good = jsonl([f"Line {i} has a [MASK] in it." for i in range(4)])
    (root / "a.jsonl").write_bytes(good + b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    (root / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(["Two [MASK] and [sMASK] here."])))
    pq.write_table(pa.table({"text": ["[gMASK]", "Tail [MASK] text."], "lang": ["de", "fr"]}),
                   root / "c.parquet")
    expected: dict[str, str | None] = {f"a.jsonl:{i}": None for i in range(4)}
    expected.update({f"a.jsonl:{4 + i}": kind for i, (_, kind) in enumerate(BAD_LINES)})
    expected.update({"b.jsonl.gz:0": None, "c.parquet:0": None, "c.parquet:1": None})
    return expected


def job_sections(inputs: str, out: str, checkpoint: Path, **extra: dict) -> dict:
    sections = {"source": {"paths": inputs, "keep_columns": ["lang"]},
                "output": {"path": out, "max_error_rate": 0.5},
                "model": {"path": str(checkpoint)}, "sampling": {"max_new_tokens": 3},
                "resources": {"batch_size": 4, "concurrency": [1, 2]}}
    for name, values in extra.items():
        sections[name] = {**sections.get(name, {}), **values}
    return sections


def read_output(path: Path | str, filesystem: pafs.FileSystem | None = None) -> pa.Table:
    dataset = pads.dataset(str(path), format="parquet", filesystem=filesystem,
                           exclude_invalid_files=False,
                           partitioning=None, ignore_prefixes=["_", "."])
    return dataset.to_table()


def check_rows(table: pa.Table, expected: dict[str, str | None]) -> None:
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(expected), "every input row exactly once"
    for row in table.to_pylist():
        assert row["error_type"] == expected[row["id"]], row
        if row["error_type"] is None:
            assert row["fills"] and all(f["finish_reason"] in ("stop", "length")
                                        for f in row["fills"])
            # every blank filled: a mask token left in the text is one a fill generated (the
            # sampled test model may pick one; seen: "a ratio [gMASK] ve")
            assert row["output_text"].count("MASK]") == sum(f["text"].count("MASK]")
                                                            for f in row["fills"])
            assert row["prompt_tokens"] == len(row["prompt_token_ids"]) > 0
            assert row["output_tokens"] == sum(len(f["token_ids"]) for f in row["fills"])
        else:
            assert row["error_message"]


def part_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}


def test_local_job_rerun_and_overwrite(ray_cluster: RayHead, small_model: Path,
                                       tmp_path: Path) -> None:
    expected = write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    sections = job_sections(str(tmp_path / "in"), str(out), small_model)
    result = InfillJob.from_kwargs(**sections).run()
    assert (result.status, result.exit_code, result.output) == ("succeeded", 0, str(out))
    assert (result.rows_in, result.rows_error) == (len(expected), len(BAD_LINES))
    manifest = result.manifest
    assert (manifest["rows_in"], manifest["rows_error"]) == (len(expected), len(BAD_LINES))
    assert manifest["this_run"]["rows"] == len(expected)
    assert {p["status"] for p in manifest["parts"].values()} == {"committed"}
    assert manifest["files_total"] == 3
    table = read_output(out)
    check_rows(table, expected)
    assert table.column("model").unique().to_pylist() == [str(small_model)]
    langs = dict(zip(table.column("id").to_pylist(), table.column("lang").to_pylist(),
                     strict=True))
    assert langs["c.parquet:1"] == "fr" and langs["a.jsonl:0"] == "en"
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert not (out / "_tmp").exists()

    before = part_mtimes(out)
    again = InfillJob.from_kwargs(**sections).run().manifest  # a finished job: nothing to do
    assert {p["status"] for p in again["parts"].values()} == {"skipped"}
    assert again["this_run"]["rows"] == 0 and again["rows_in"] == len(expected)
    assert part_mtimes(out) == before

    changed = job_sections(str(tmp_path / "in"), str(out), small_model,
                           sampling={"max_new_tokens": 2})
    with pytest.raises(OutputError, match="another config"):
        InfillJob.from_kwargs(**changed).run()
    changed["output"]["overwrite"] = True
    redone = InfillJob.from_kwargs(**changed).run().manifest
    assert redone["this_run"]["rows"] == len(expected)
    fills = read_output(out).column("fills").to_pylist()
    assert max(len(f["token_ids"]) for row in fills for f in row or []) == 2


def test_scores_are_totalled_per_mask_kind_and_rebuilt_on_resume(
        ray_cluster: RayHead, small_model: Path, tmp_path: Path) -> None:
    """`span` knows the answers: every filled row is scored, the manifest totals the scores,
    and a rerun (every part skipped) rebuilds the same totals from the parts."""
    (tmp_path / "in").mkdir()
    texts = [f"Row {i} says that the quick brown fox jumps over the lazy dog." for i in range(6)]
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl(texts))
    sections = job_sections(str(tmp_path / "in"), str(tmp_path / "out"), small_model,
                            prompt={"policy": "span"})
    quality = InfillJob.from_kwargs(**sections).run().manifest["quality"]
    rows = read_output(tmp_path / "out").to_pylist()
    assert all(len(r["target"]) == len(r["fills"]) == len(r["blank_token_f1"]) for r in rows)
    f1s = [f1 for r in rows for f1 in r["blank_token_f1"]]
    assert quality["[MASK]"]["blanks"] == len(f1s)
    assert quality["[MASK]"]["token_f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-6)
    assert quality["rows"]["scored"] == len(rows) == len(texts)
    assert quality["rows"]["exact"] == sum(r["exact_match"] for r in rows)
    assert list(quality) == ["[MASK]", "rows"]
    assert InfillJob.from_kwargs(**sections).run().manifest["quality"] == quality


def test_error_rate_above_threshold_fails_after_writing(ray_cluster: RayHead,
                                                        small_model: Path,
                                                        tmp_path: Path) -> None:
    expected = write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    sections = job_sections(str(tmp_path / "in"), str(out), small_model,
                            output={"max_error_rate": 0.2})
    with pytest.raises(JobFailed, match=r"6 of 13 rows failed .* > output.max_error_rate 0.2"):
        InfillJob.from_kwargs(**sections).run()
    check_rows(read_output(out), expected)
    assert json.loads((out / MANIFEST).read_text())["status"] == "failed"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(sections))
    assert run_main([str(config)]) == 1  # resumes (nothing to do) and still fails
    assert run_main([str(config), "--set", "output.max_error_rate=0.5"]) == 0


def test_s3_input_output_and_config(ray_cluster: RayHead, s3: SeaweedS3, small_model: Path,
                                    tmp_path: Path) -> None:
    """The workers read S3 with the keys they inherited and the endpoint of the config."""
    expected = write_corpus(tmp_path / "in")
    client = s3.client()
    for path in (tmp_path / "in").iterdir():
        client.put_object(Bucket=BUCKET, Key=f"job/in/{path.name}", Body=path.read_bytes())
    sections = job_sections(f"s3://{BUCKET}/job/in", f"s3://{BUCKET}/job/out", small_model,
                            source={"storage": {"endpoint_url": s3.endpoint}})
    client.put_object(Bucket=BUCKET, Key="job/config.yaml", Body=yaml.safe_dump(sections))
    manifest = InfillJob.from_yaml(f"s3://{BUCKET}/job/config.yaml").run().manifest
    assert manifest["status"] == "succeeded" and manifest["rows_in"] == len(expected)
    filesystem = pafs.S3FileSystem(endpoint_override=s3.endpoint, region=REGION)
    check_rows(read_output(f"{BUCKET}/job/out", filesystem), expected)
    stored = json.loads(client.get_object(Bucket=BUCKET, Key="job/out/_manifest.json")["Body"]
                        .read())
    assert stored["config_hash"] == manifest["config_hash"]
    assert stored["parts"] and all(name.startswith("part-") for name in stored["parts"])


def test_resume_after_sigkill(ray_cluster: RayHead, ray_env: dict[str, str], small_model: Path,
                              tmp_path: Path) -> None:
    """Kill the job's driver once a part is committed, then re-run.

    The driver runs in a subprocess on the shared head, as `ray job submit` would run it; Ray
    ends the actors of a job whose driver died, and the re-run (in this process) resumes."""
    shards, rows_per_shard = 8, 4
    (tmp_path / "in").mkdir()
    for s in range(shards):
        texts = [f"Shard {s} row {r} [MASK] then [MASK] end." for r in range(rows_per_shard)]
        (tmp_path / "in" / f"s{s}.jsonl").write_bytes(jsonl(texts))
    out = tmp_path / "out"
    sections = job_sections(str(tmp_path / "in"), str(out), small_model,
                            sampling={"max_new_tokens": 24},
                            resources={"batch_size": 1, "concurrency": 1},
                            ray={"num_cpus": 4})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(sections))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.run_infill", str(config)], cwd=REPO,
                            env=ray_env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not part_mtimes(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the driver's process group
            os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    killed_at = part_mtimes(out)
    assert 0 < len(killed_at) < shards, "the job must be killed mid-run"
    print(f"killed with {len(killed_at)}/{shards} files committed")

    manifest = InfillJob.from_kwargs(**sections).run().manifest
    statuses = {name: p["status"] for name, p in manifest["parts"].items()}
    assert all(statuses[name] == "skipped" for name in killed_at)
    assert sum(s == "committed" for s in statuses.values()) == shards - len(killed_at)
    after = part_mtimes(out)
    assert {name: after[name] for name in killed_at} == killed_at, "committed parts kept"
    assert len(after) == shards and not (out / "_tmp").exists()
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"s{s}.jsonl:{r}" for s in range(shards)
                                 for r in range(rows_per_shard))
    assert manifest["rows_in"] == shards * rows_per_shard and manifest["rows_error"] == 0


@pytest.mark.timeout(600)
def test_vllm_engine_job_matches_torch(ray_env: dict[str, str], tmp_path: Path) -> None:
    """The async path (afill per row, continuous batching) in a Ray actor gives the torch
    rows."""
    pytest.importorskip("vllm")
    from tests.unit.engines.vllm_helpers import IN_PROCESS, stopping_checkpoint

    assert IN_PROCESS.items() <= VLLM_CPU_ENV.items(), "the head's workers must get them"

    model = stopping_checkpoint(tmp_path / "model")
    expected = write_corpus(tmp_path / "in")
    outputs = {}
    for engine in ("torch", "vllm"):
        out = tmp_path / f"out-{engine}"
        options = {"kv_cache_gb": 1, "max_num_seqs": 8} if engine == "vllm" else {}
        sections = job_sections(str(tmp_path / "in"), str(out), model,
                                model={"engine": engine, "engine_options": options},
                                sampling={"max_new_tokens": 6}, ray={"num_cpus": 4})
        config = tmp_path / f"{engine}.yaml"
        config.write_text(yaml.safe_dump(sections))
        # A driver of its own on the shared head, whose workers have the vLLM variables.
        done = subprocess.run([sys.executable, "-m", "jobs.run_infill", str(config)], cwd=REPO,
                              env=ray_env, capture_output=True, text=True, timeout=280)
        assert done.returncode == 0, done.stderr[-3000:]
        table = read_output(out).sort_by("id")
        check_rows(table, expected)
        outputs[engine] = table.select(["id", "output_text", "fills", "error_type"])
    assert outputs["vllm"].column("output_text").to_pylist() == (
        outputs["torch"].column("output_text").to_pylist())
    assert outputs["vllm"].equals(outputs["torch"])


def test_ray_job_submit(ray_address: str, small_model: Path, tmp_path: Path) -> None:
    """`ray job submit --working-dir . -- python -m jobs.run_infill CONFIG --set ...`."""
    expected = write_corpus(tmp_path / "in")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job_sections(str(tmp_path / "in"), str(tmp_path / "out"),
                                                  small_model)))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_address,
         "--working-dir", ".", "--", "python", "-m", "jobs.run_infill", str(config),
         "--set", "sampling.max_new_tokens=2"],
        cwd=REPO, env=head_env(), capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded: 13 rows (7 ok, 6 errors" in done.stdout
    check_rows(read_output(tmp_path / "out"), expected)



def test_results_as_a_lazy_dataset(ray_cluster: RayHead, small_model: Path,
                                   tmp_path: Path) -> None:
    """`InfillJob.dataset()` composes with other Ray Data steps and writes nothing; its rows
    are the rows `run()` commits (same seeds, same schema)."""
    expected = write_corpus(tmp_path / "in")
    sections = job_sections(str(tmp_path / "in"), str(tmp_path / "out"), small_model,
                            sampling={"seed": 3, "temperature": 0.8})
    ds = InfillJob.from_kwargs(**sections).dataset()
    # reading runs a few units ahead (backpressure.py): a budget of its own, the session's
    # default context untouched
    assert ds.context.execution_options.resource_limits.object_store_memory == MIN_BUDGET
    assert DataContext.get_current().execution_options.resource_limits.object_store_memory \
        == float("inf")
    # reads and writes: at most as many at once as generate actors (2 for 3 units), each one
    # running at once is a worker process Ray keeps
    assert task_pool_sizes(ds) == {"ReadUnit": 2, "MapBatches(output_rows)": 2}
    ok = ds.filter(lambda row: row["error_type"] is None)  # lazy until counted
    assert ok.count() == sum(error is None for error in expected.values())
    rows = pa.Table.from_pylist(ds.take_all())
    check_rows(rows, expected)
    assert {"model", "engine", "lang"} <= set(rows.column_names)
    assert not (tmp_path / "out").exists()  # nothing written, no manifest
    InfillJob.from_kwargs(**sections).run()
    committed = {r["id"]: r["fills"] for r in read_output(tmp_path / "out").to_pylist()}
    assert {r["id"]: r["fills"] for r in rows.to_pylist()} == committed


def task_pool_sizes(ds: ray.data.Dataset) -> dict[str, int | None]:
    """The most tasks at once of each task-pool stage of a dataset's (logical) plan."""
    sizes, ops = {}, [ds._logical_plan.dag]
    while ops:
        op = ops.pop()
        if isinstance(getattr(op, "compute", None), ray.data.TaskPoolStrategy):
            sizes[op.name] = op.compute.size
        ops += op.input_dependencies
    return sizes


def test_engine_settings_refused_on_the_cluster_are_a_config_error(
        ray_cluster: RayHead, small_model: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """An engine that cannot start with the config's settings (here a CUDA device on a machine
    without one) fails the job with exit 2 and one line naming the cause, and the manifest
    says failed with that reason: no retry fixes a setting."""
    write_corpus(tmp_path / "in")
    code = run_main(["--set", f"source.paths={tmp_path / 'in'}",
                     "--set", f"output.path={tmp_path / 'out'}",
                     "--set", "source.id_column=null", "--set", "source.target_column=null",
                     "--set", f"model.path={small_model}",
                     "--set", "model.device=cuda"])
    assert code == 2
    ours = [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("[glm-infill]")]  # Ray prints the actor's traceback too
    assert ours[-1].startswith("[glm-infill] error: ") and "EngineConfigError: " in ours[-1]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "failed" and "EngineConfigError: " in manifest["reason"]

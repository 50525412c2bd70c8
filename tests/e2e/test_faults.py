"""Faults for real: S3 stopped mid-run, a file deleted after planning, a generate actor killed,
a disk that fills up, poisonous and damaged input. Every case ends with every input row exactly
once in the output (after at most one resume), never a row standing for rows that were lost.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest

from pipeline.job.runner import InfillJob, InfrastructureError, JobFailed
from pipeline.job.storage import MANIFEST
from tests.e2e.ray_head import RayHead
from tests.e2e.s3 import BUCKET, REGION, SeaweedS3
from tests.e2e.test_job import jsonl, read_output

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[2]
QUICK_RETRY = {"attempts": 2, "first_backoff_s": 0.1, "max_backoff_s": 0.2}


def sections(inputs: str, out: str, model: Path, **extra: dict) -> dict:
    base = {"source": {"paths": inputs, "unit_bytes": 600},
            "output": {"path": out, "max_error_rate": 0.5},
            "model": {"path": str(model)}, "sampling": {"max_new_tokens": 2},
            "resources": {"batch_size": 8, "concurrency": 1}}
    for name, values in extra.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def write_files(root: Path, files: int, rows: int) -> list[str]:
    """`files` JSONL files of `rows` good rows each; returns the expected fallback ids."""
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    for f in range(files):
        texts = [f"File {f} row {r} has a [MASK] here." for r in range(rows)]
        (root / f"f{f}.jsonl").write_bytes(jsonl(texts))
        ids += [f"f{f}.jsonl:{r}" for r in range(rows)]
    return ids


class Background:
    """A job run in a thread; `result` is its manifest or the exception it raised."""

    def __init__(self, job: InfillJob):
        self.result: object = None
        self.thread = threading.Thread(target=self._run, args=(job,), daemon=True)
        self.thread.start()

    def _run(self, job: InfillJob) -> None:
        try:
            self.result = job.run().manifest
        except BaseException as err:  # noqa: BLE001 - handed to the test
            self.result = err

    def wait(self, timeout: float = 300) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the job did not finish"
        return self.result


def wait_for(condition: Callable[[], bool], timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_until_done(config: dict) -> dict:
    """Run, and once more if an infrastructure fault stopped the first run (a resume)."""
    try:
        return InfillJob.from_kwargs(**config).run().manifest
    except InfrastructureError:
        return InfillJob.from_kwargs(**config).run().manifest


def test_s3_outage_during_reading_and_writing(ray_cluster: RayHead, s3: SeaweedS3,
                                              small_model: Path, tmp_path: Path) -> None:
    """S3 down for 20 s twice while units are read and parts written: retried, not data."""
    client = s3.client()
    ids = []
    for f in range(4):
        texts = [f"File {f} row {r} has a [MASK] here." for r in range(40)]
        client.put_object(Bucket=BUCKET, Key=f"outage/in/f{f}.jsonl", Body=jsonl(texts))
        ids += [f"f{f}.jsonl:{r}" for r in range(40)]
    config = sections(f"s3://{BUCKET}/outage/in", f"s3://{BUCKET}/outage/out", small_model,
                      source={"storage": {"endpoint_url": s3.endpoint}},
                      sampling={"max_new_tokens": 6},
                      retry={"attempts": 8, "first_backoff_s": 0.5, "max_backoff_s": 8})
    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint, region=REGION)

    def parts() -> int:
        selector = pafs.FileSelector(f"{BUCKET}/outage/out", allow_not_found=True)
        return sum(i.base_name.startswith("part-") for i in fs.get_file_info(selector))

    run = Background(InfillJob.from_kwargs(**config))
    for outage in range(2):
        wait_for(lambda n=outage: parts() > n * 3 or not run.thread.is_alive(), what="parts")
        if not run.thread.is_alive():
            break
        s3.stop()
        time.sleep(20)
        s3.start()
        print(f"outage {outage + 1} over with {parts()} parts committed")
    result = run.wait()
    if isinstance(result, InfrastructureError):  # at most one resume
        print(f"first run failed ({result}); resuming")
        result = InfillJob.from_kwargs(**config).run().manifest
    assert isinstance(result, dict), result
    assert result["status"] == "succeeded" and result["rows_error"] == 0
    table = read_output(f"{BUCKET}/outage/out", fs)
    assert sorted(table.column("id").to_pylist()) == sorted(ids), "every row exactly once"
    assert set(table.column("error_type").to_pylist()) == {None}


def test_file_deleted_after_planning(ray_cluster: RayHead, small_model: Path,
                                     tmp_path: Path) -> None:
    ids = write_files(tmp_path / "in", files=3, rows=6)
    doomed = tmp_path / "in" / "f1.jsonl"
    out = tmp_path / "out"
    config = sections(str(tmp_path / "in"), str(out), small_model, retry=QUICK_RETRY)

    def log(message: str) -> None:
        print(message)
        if "read tasks to do" in message:  # planned, nothing read yet
            doomed.unlink()

    with pytest.raises(InfrastructureError, match="f1.jsonl") as failed:
        InfillJob(InfillJob.from_kwargs(**config).config, log=log).run()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "failed" and "f1.jsonl" in manifest["reason"]
    result = failed.value.result  # the SDK's typed result of the failed run
    assert (result.status, result.exit_code, result.reason) == ("failed", 3, manifest["reason"])
    committed = read_output(out).column("id").to_pylist() if any(out.glob("part-*")) else []
    assert not any(i.startswith("f1.jsonl") for i in committed), "no row stands for f1"
    assert len(committed) == len(set(committed))

    final = InfillJob.from_kwargs(**config).run().manifest  # the file is gone: the rest
    assert final["status"] == "succeeded" and final["files_total"] == 2
    assert sorted(read_output(out).column("id").to_pylist()) == sorted(
        i for i in ids if not i.startswith("f1.jsonl"))


def generate_actor_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "MapBatches(GenerateStage)" in " ".join(p.info["cmdline"] or [])]


def test_sigkill_of_a_generate_actor(ray_cluster: RayHead, small_model: Path,
                                     tmp_path: Path) -> None:
    """Ray restarts the actor and retries its calls: every row exactly once, all ok."""
    ids = write_files(tmp_path / "in", files=4, rows=30)
    out = tmp_path / "out"
    config = sections(str(tmp_path / "in"), str(out), small_model,
                      sampling={"max_new_tokens": 16})
    run = Background(InfillJob.from_kwargs(**config))
    wait_for(lambda: any(out.glob("part-*.parquet")) or not run.thread.is_alive(),
             what="the first part")
    victims = generate_actor_pids()
    assert victims and run.thread.is_alive(), "the job must still be generating"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    print(f"killed generate actor(s) {victims}")
    result = run.wait()
    assert isinstance(result, dict), result
    assert result["status"] == "succeeded" and result["rows_error"] == 0
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_then_resume(ray_cluster: RayHead, small_model: Path, tmp_path: Path) -> None:
    """Parts that do not fit fail the run (retried, then a fault), the manifest on disk stays
    valid, committed parts are whole, and the resume on a bigger disk finishes the job."""
    rng = random.Random(0)
    root = tmp_path / "in"
    root.mkdir()
    ids = []
    for f in range(6):
        rows = [{"text": f"File {f} row {r} [MASK].",
                 "blob": "".join(rng.choices(string.ascii_letters, k=12_000))}
                for r in range(20)]
        (root / f"f{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        ids += [f"f{f}.jsonl:{r}" for r in range(20)]
    with small_disk(tmp_path / "disk", "700k") as disk:
        out = disk / "out"
        config = sections(str(root), str(out), small_model, retry=QUICK_RETRY,
                          source={"keep_columns": ["blob"], "unit_bytes": 100_000})
        with pytest.raises(InfrastructureError, match="No space left|space"):
            InfillJob.from_kwargs(**config).run()
        manifest = json.loads((out / MANIFEST).read_text())  # whole JSON, never half a file
        assert manifest["status"] in ("running", "failed")
        partial = read_output(out)  # every part on disk is a complete Parquet file
        assert 0 < len(set(partial.column("id").to_pylist())) < len(ids)
        subprocess.run(["mount", "-o", "remount,size=50m", str(disk)], check=True)
        final = run_until_done(config)
        assert final["status"] == "succeeded"
        assert sorted(read_output(out).column("id").to_pylist()) == sorted(ids)


def test_poisonous_and_damaged_input(ray_cluster: RayHead, small_model: Path,
                                     tmp_path: Path) -> None:
    """A lone surrogate, a BOM, a huge line beside good rows; a truncated .gz keeps its
    complete lines and fails the job until skipping damaged files is allowed; equal file names
    in two folders keep distinct ids."""
    root = tmp_path / "in"
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir()
    (root / "x" / "same.jsonl").write_bytes(
        b'\xef\xbb\xbf{"text": "BOM first [MASK]."}\n'
        b'{"text": "bad \\ud800 [MASK]"}\n'
        + b'{"text": "' + b"h" * 3000 + b' [MASK]"}\n'
        + b'{"text": "good [MASK] row"}\n')
    (root / "y" / "same.jsonl").write_bytes(jsonl(["other [MASK] folder"]))
    body = jsonl([f"Archived row {i} with a [MASK] and some padding text." for i in range(300)])
    data = gzip.compress(body)
    (root / "y" / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    config = sections(str(root), str(out), small_model, source={"max_line_bytes": 1000})
    with pytest.raises(JobFailed, match="could not be read whole"):
        InfillJob.from_kwargs(**config).run()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "failed"
    assert list(manifest["damaged_files"]) == [str(root / "y" / "cut.jsonl.gz")]
    table = read_output(out)
    errors = dict(zip(table.column("id").to_pylist(), table.column("error_type").to_pylist(),
                      strict=True))
    assert {k: v for k, v in errors.items() if not k.startswith("y/cut")} == {
        "x/same.jsonl:0": None, "x/same.jsonl:1": "invalid_text",
        "x/same.jsonl:2": "line_too_long", "x/same.jsonl:3": None, "y/same.jsonl:0": None}
    kept = [k for k in errors if k.startswith("y/cut")]
    assert 0 < len(kept) < 300 and all(errors[k] is None for k in kept)

    config["source"]["skip_unreadable_files"] = True  # not part of the config hash
    accepted = InfillJob.from_kwargs(**config).run().manifest
    assert accepted["status"] == "succeeded" and accepted["this_run"]["rows"] == 0
    assert list(accepted["damaged_files"]) == [str(root / "y" / "cut.jsonl.gz")]


TWO_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from pipeline.job.runner import InfillJob

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
cluster.add_node(num_cpus=2)
ray.init(address=cluster.address)
manifest = InfillJob.from_kwargs(**json.loads(sys.argv[1])).run().manifest
print(json.dumps(sorted({p["node"] for p in manifest["parts"].values()})))
ray.shutdown()
cluster.shutdown()
"""


def test_parts_written_on_both_nodes_of_a_two_node_cluster(small_model: Path,
                                                           tmp_path: Path) -> None:
    """Writes happen on the workers: with two nodes, both write parts (own cluster, so in a
    subprocess: the session's shared head is a one-node cluster)."""
    ids = write_files(tmp_path / "in", files=6, rows=12)
    out = tmp_path / "out"
    config = sections(str(tmp_path / "in"), str(out), small_model,
                      resources={"concurrency": 2})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", TWO_NODES, json.dumps(config)], cwd=REPO,
                          env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    nodes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(nodes) == 2, nodes
    assert sorted(read_output(out).column("id").to_pylist()) == sorted(ids)

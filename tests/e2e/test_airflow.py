"""Submitting the infill job to Ray: the submit/wait/fail logic against a real local Ray head
(the session's shared one, tests/e2e/conftest.py), and the Airflow DAG that drives it (parsed,
and run with `dag.test()` against the same head)."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobSubmissionClient

from jobs.ray_submit import (
    RayJobFailed,
    attempt_id,
    base_submission_id,
    ensure_submitted,
    infill_entrypoint,
    latest_attempt,
    make_client,
    run_job,
    wait_for_job,
)

pytestmark = pytest.mark.timeout(300)  # per test; the head's start has its own 120 s limit

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "jobs" / "airflow_dag.py"


def python(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


OK = python("print('hello from ray')")
FAIL = python("print('something broke: disk on fire'); import sys; sys.exit(3)")


@pytest.fixture
def client(ray_address: str) -> JobSubmissionClient:
    return make_client(ray_address)


def jobs_under(client: JobSubmissionClient, base: str) -> list[str]:
    return sorted(j.submission_id for j in client.list_jobs()
                  if (j.submission_id or "").startswith(base))


# -- pure helpers -------------------------------------------------------------------------
def test_submission_ids_are_deterministic_and_url_safe():
    when = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    assert base_submission_id("glm_infill", when) == "glm_infill__20260304T050607"
    assert base_submission_id("my dag/x", "manual__2026-03-04T05:06:07+00:00") == (
        "my_dag_x__manual__2026-03-04T05_06_07_00_00")
    assert attempt_id("b", 0) == "b" and attempt_id("b", 2) == "b-retry2"


def test_entrypoint_writes_one_partition_per_interval():
    entry = infill_entrypoint("s3://bucket/job.yaml", "s3://bucket/out/",
                              dt.datetime(2026, 3, 4, 23, 0, tzinfo=dt.UTC),
                              ["sampling.seed=3", "prompt.template=Q: {q} A: [MASK]"])
    assert shlex.split(entry) == [
        "python", "-m", "jobs.run_infill", "s3://bucket/job.yaml",
        "--set", "output.path=s3://bucket/out/dt=2026-03-04",
        "--set", "sampling.seed=3", "--set", "prompt.template=Q: {q} A: [MASK]"]


# -- against a real Ray head --------------------------------------------------------------
def test_success_then_rerun_does_nothing(client):
    base = base_submission_id("test_ok", dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    assert run_job(client, base, OK, poll_s=0.5, timeout_s=120) == base
    assert "hello from ray" in client.get_job_logs(base)
    # the same logical date again (an Airflow retry or a cleared task): no new job
    assert run_job(client, base, OK, poll_s=0.5, timeout_s=120) == base
    assert jobs_under(client, base) == [base]


def test_failure_raises_with_the_log_tail_and_retries_resubmit(client):
    base = base_submission_id("test_fail", dt.datetime(2026, 1, 3, tzinfo=dt.UTC))
    with pytest.raises(RayJobFailed, match="FAILED") as failed:
        run_job(client, base, FAIL, poll_s=0.5, timeout_s=120)
    assert "disk on fire" in str(failed.value) and base in str(failed.value)
    with pytest.raises(RayJobFailed, match="disk on fire"):
        run_job(client, base, FAIL, poll_s=0.5, timeout_s=120)
    attempt, latest = latest_attempt(client, base)
    assert (attempt, latest.submission_id, str(latest.status)) == (1, f"{base}-retry1", "FAILED")
    # a retry after the cause is fixed succeeds under the next id; after that, nothing new
    assert run_job(client, base, OK, poll_s=0.5, timeout_s=120) == f"{base}-retry2"
    assert run_job(client, base, FAIL, poll_s=0.5, timeout_s=120) == f"{base}-retry2"
    assert jobs_under(client, base) == [base, f"{base}-retry1", f"{base}-retry2"]


def test_a_running_job_is_waited_for_not_resubmitted(client):
    base = base_submission_id("test_running", dt.datetime(2026, 1, 4, tzinfo=dt.UTC))
    slow = python("import time; time.sleep(4); print('slow done')")
    first = ensure_submitted(client, base, slow)
    assert ensure_submitted(client, base, slow) == first  # still pending or running
    with pytest.raises(TimeoutError):
        wait_for_job(client, first, poll_s=0.2, timeout_s=0.5)
    assert run_job(client, base, slow, poll_s=0.5, timeout_s=120) == first
    assert jobs_under(client, base) == [base]


# -- the Airflow DAG ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A throwaway AIRFLOW_HOME (sqlite) whose dags folder holds only our DAG file."""
    home = tmp_path_factory.mktemp("airflow")
    (home / "dags").mkdir()
    (home / "dags" / DAG_FILE.name).symlink_to(DAG_FILE)
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("AIRFLOW_HOME", home), ("AIRFLOW__CORE__LOAD_EXAMPLES", "False"),
                            ("AIRFLOW__CORE__DAGS_FOLDER", home / "dags")):
            env.setenv(name, str(value))
        yield home


@pytest.fixture(scope="module")
def infill_dag(airflow_home: Path):
    pytest.importorskip("airflow")
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(airflow_home / "dags"))
    assert bag.import_errors == {}
    return bag.dags["glm_infill"]


def test_dag_parses(infill_dag):
    assert infill_dag.task_ids == ["run_infill"]
    assert infill_dag.default_args["retries"] >= 1
    assert set(infill_dag.params) == {"config", "output_prefix", "overrides", "ray_address",
                                      "working_dir", "poll_seconds"}


def test_dag_run_fails_with_the_job_and_its_retry_resubmits(infill_dag, airflow_home,
                                                             ray_address, client):
    """`dag.test()` end to end: a config the job cannot read -> the Ray job fails -> the task
    fails, the Airflow retry submits the next attempt, and the run ends failed."""
    from airflow.utils.db import initdb

    initdb()
    task = infill_dag.get_task("run_infill")
    task.retries, task.retry_delay = 1, dt.timedelta(0)
    logical = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    run = infill_dag.test(logical_date=logical, run_conf={
        "ray_address": ray_address, "config": str(airflow_home / "missing.yaml"),
        "output_prefix": str(airflow_home / "out"), "poll_seconds": 0.5})
    assert run.state == "failed"
    base = base_submission_id("glm_infill", logical)
    assert jobs_under(client, base) == [base, f"{base}-retry1"]
    entrypoint = client.get_job_info(base).entrypoint
    assert entrypoint == infill_entrypoint(str(airflow_home / "missing.yaml"),
                                           str(airflow_home / "out"), logical)
    assert "missing.yaml" in client.get_job_logs(base)


def test_dag_file_has_no_top_level_ray_import():
    """The scheduler parses the file often; Ray is only imported when the task runs."""
    top_level = [line for line in DAG_FILE.read_text().splitlines()
                 if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if "ray" in line]


def test_dag_run_infills_one_partition_and_a_rerun_does_nothing(infill_dag, airflow_home,
                                                                 ray_address, client,
                                                                 small_model, tmp_path):
    """`dag.test()` end to end with the real pipeline: a few sample rows through Ray."""
    from airflow.utils.db import initdb

    initdb()
    rows = (ROOT / "data" / "sample" / "masked" / "part-000.jsonl").read_text().splitlines()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_text("\n".join(rows[:4]) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"paths": str(tmp_path / "in")}, "output": {"path": "overridden"},
        "model": {"path": str(small_model)}, "sampling": {"max_new_tokens": 2},
        "resources": {"batch_size": 4}}))
    logical = dt.datetime(2026, 2, 2, 6, 0, tzinfo=dt.UTC)
    conf = {"ray_address": ray_address, "config": str(config),
            "output_prefix": str(tmp_path / "out"), "poll_seconds": 0.5}
    assert infill_dag.test(logical_date=logical, run_conf=conf).state == "success"
    partition = tmp_path / "out" / "dt=2026-02-02"
    manifest = json.loads((partition / "_manifest.json").read_text())
    assert (manifest["status"], manifest["rows_in"]) == ("succeeded", 4)
    base = base_submission_id("glm_infill", logical)
    assert jobs_under(client, base) == [base]
    # the same interval again: the task finds the succeeded job and submits nothing
    assert infill_dag.test(logical_date=logical, run_conf=conf).state == "success"
    assert jobs_under(client, base) == [base]

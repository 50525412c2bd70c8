"""Submitting the infill job to Ray: the submit/wait/fail logic against a real local Ray head
(the session's shared one, tests/e2e/conftest.py), and the Airflow DAG that drives it (parsed,
and run with `dag.test()` against the same head; one more head with token auth for the token
checks). `dag.test()` runs a deferred task's trigger in line, then resumes the task.

Most DAG runs replace the job's entrypoint with a small Python command that prints what
`glm-infill run` prints last (`[glm-infill] result {JSON}`) and exits with its exit code; two
run the real pipeline."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.job_submission import JobSubmissionClient

import jobs.ray_submit
from jobs.ray_submit import (
    FORCE_KEY,
    RayJobFailed,
    attempt_id,
    base_submission_id,
    ensure_submitted,
    infill_entrypoint,
    latest_attempt,
    run_job,
    wait_for_job,
)
from pipeline.job.cluster import make_client
from pipeline.job.result import RESULT_MARK, find_result

pytestmark = pytest.mark.timeout(300)  # per test; the head's start has its own 120 s limit

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "jobs" / "airflow_dag.py"


def python(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


OK = python("print('hello from ray')")
FAIL = python("print('something broke: disk on fire'); import sys; sys.exit(3)")


def job_with_result(exit_code: int, before: str = "", **fields: Any) -> str:
    """A job that prints what `glm-infill run` prints last, and exits with `exit_code`."""
    result = {"status": "succeeded" if exit_code == 0 else "failed", "exit_code": exit_code,
              "reason": None, "output": "/out/dt=2026-02-01", **fields}
    return python(f"{before}print({RESULT_MARK + json.dumps(result)!r}); "
                  f"import sys; sys.exit({exit_code})")


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


def test_the_last_result_line_is_the_outcome():
    first = RESULT_MARK + json.dumps({"status": "failed", "exit_code": 3})
    last = RESULT_MARK + json.dumps({"status": "succeeded", "exit_code": 0, "rows_in": 4})
    assert find_result(f"progress\n{first}\nresumed\n{last}\n") == {
        "status": "succeeded", "exit_code": 0, "rows_in": 4}
    assert find_result("no result here\n  " + last) is None  # only a line of its own
    assert find_result(RESULT_MARK + '{"status": "succ') is None  # cut off: no outcome


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


def test_force_redoes_a_succeeded_partition_once_then_resumes(client):
    base = base_submission_id("test_force", dt.datetime(2026, 1, 5, tzinfo=dt.UTC))
    assert run_job(client, base, OK, poll_s=0.5, timeout_s=120) == base
    # a forced run: a new attempt with --overwrite even though the partition succeeded
    forced = ensure_submitted(client, base, FAIL, force_key="run-a")
    assert forced == f"{base}-retry1"
    wait_for_job(client, forced, poll_s=0.5, timeout_s=120)
    info = client.get_job_info(forced)
    assert info.entrypoint == f"{FAIL} --overwrite" and info.metadata[FORCE_KEY] == "run-a"
    # its retry resumes (no --overwrite); once it succeeded, that forced run is done
    resumed = ensure_submitted(client, base, OK, force_key="run-a")
    assert client.get_job_info(resumed).entrypoint == OK
    wait_for_job(client, resumed, poll_s=0.5, timeout_s=120)
    assert ensure_submitted(client, base, OK, force_key="run-a") == resumed
    assert ensure_submitted(client, base, OK) == resumed  # and an unforced run reuses it
    assert jobs_under(client, base) == [base, f"{base}-retry1", f"{base}-retry2"]


# -- the Airflow DAG ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A throwaway AIRFLOW_HOME (sqlite, migrated once) whose dags folder holds only our DAG
    file."""
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
    from airflow.utils.db import initdb

    bag = DagBag(dag_folder=str(airflow_home / "dags"))
    assert bag.import_errors == {}
    initdb()
    return bag.dags["glm_infill"]


def set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, address: str,
                   token: str | None = None) -> None:
    """An Airflow connection from the environment (JSON form), as a deployment may set it."""
    host, port = address.removeprefix("http://").split(":")
    conn = {"conn_type": "generic", "host": host, "port": int(port), "password": token}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


@pytest.fixture
def ray_connection(monkeypatch: pytest.MonkeyPatch, ray_address: str) -> None:
    """The DAG's default connection, `glm_infill_ray`, names the shared head (no token)."""
    set_connection(monkeypatch, "glm_infill_ray", ray_address)


@pytest.fixture
def fake_job(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make the DAG submit `command` instead of `python -m jobs.run_infill ...`."""
    def use(command: str) -> None:
        monkeypatch.setattr(jobs.ray_submit, "infill_entrypoint", lambda *args: command)
    return use


@pytest.fixture
def trigger_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The submission ids the DAG's trigger waited for: proof that the task deferred."""
    from jobs.airflow_ray import RayJobTrigger

    waited: list[str] = []
    original = RayJobTrigger.run

    def run(self):
        waited.append(self.submission_id)
        return original(self)
    monkeypatch.setattr(RayJobTrigger, "run", run)
    return waited


# Every param, every run: a task run in this process writes the run's conf into the DAG's
# Param objects (airflow.sdk.definitions.param.Param.resolve), so a param left out would keep
# the value of an earlier run.
DEFAULT_CONF = {"config": "jobs/default.yaml", "output_prefix": "output/glm-infill",
                "overrides": [], "ray_conn_id": "glm_infill_ray", "working_dir": None,
                "force": False, "poll_seconds": 0.5}


def run_dag(dag, logical: dt.datetime, retries: int = 0, **conf: Any):
    """`dag.test()` with the given retries (no delay between tries); the dag run."""
    task = dag.get_task("run_infill")
    saved = task.retries, task.retry_delay
    task.retries, task.retry_delay = retries, dt.timedelta(0)
    try:
        return dag.test(logical_date=logical, run_conf={**DEFAULT_CONF, **conf})
    finally:
        task.retries, task.retry_delay = saved


def task_instance(run):
    return run.get_task_instance("run_infill")


def xcom(run, key: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=run.run_id, key=key,
                                                 dag_ids=run.dag_id)).one()
        return XComModel.deserialize_value(row)


def test_dag_parses(infill_dag):
    assert infill_dag.task_ids == ["run_infill"]
    assert infill_dag.default_args["retries"] >= 1
    assert set(infill_dag.params) == set(DEFAULT_CONF)


def test_parsing_the_dag_file_does_not_import_ray(airflow_home):
    """The DAG processor parses the file often; Ray is imported only when a task runs."""
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    done = subprocess.run([sys.executable, "-c", code, str(DAG_FILE)], cwd=ROOT, timeout=120,
                          capture_output=True, text=True, env=os.environ, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_cluster_address_from_a_connection():
    from airflow.sdk import Connection

    from jobs.airflow_ray import cluster_address

    def address(uri: str) -> str:
        return cluster_address(Connection.from_uri(uri, conn_id="ray"))

    assert address("generic://:s3cret@ray-head") == "http://ray-head:8265"
    assert address("generic://ray-head:9000/https") == "https://ray-head:9000"
    conn = Connection(conn_id="ray", conn_type="generic", host="https://ray.example.com/")
    assert cluster_address(conn) == "https://ray.example.com"
    assert Connection.from_uri("generic://:s3%2Fcret@ray-head", conn_id="ray").password == (
        "s3/cret")


def test_dag_run_defers_and_reports_the_job(infill_dag, ray_connection, fake_job,
                                            trigger_runs, client, capfd):
    """The task submits, defers (the trigger waits while the job runs), resumes, and puts the
    job's log tail in the task log and its result in XCom."""
    # (the output, not the command, which Ray's log repeats, holds "working hard")
    fake_job(job_with_result(0, before="import time; time.sleep(2); print('working', 'hard'); ",
                             rows_in=4, rows_ok=4))
    logical = dt.datetime(2026, 2, 3, tzinfo=dt.UTC)
    run = run_dag(infill_dag, logical)
    assert run.state == "success"
    base = base_submission_id("glm_infill", logical)
    assert trigger_runs == [base]
    summary = xcom(run, "summary")
    assert (summary["status"], summary["rows_ok"], summary["submission_id"],
            summary["ray_status"]) == ("succeeded", 4, base, "SUCCEEDED")
    assert "working hard" in xcom(run, "log_tail")
    assert "working hard" in capfd.readouterr().out


def test_a_job_that_may_pass_on_a_retry_is_retried(infill_dag, ray_connection, fake_job,
                                                    client):
    """An infrastructure failure (exit 3): the retry submits the next attempt (which resumes)."""
    fake_job(job_with_result(3, reason="storage unreachable"))
    logical = dt.datetime(2026, 2, 4, tzinfo=dt.UTC)
    run = run_dag(infill_dag, logical, retries=1)
    assert run.state == "failed" and task_instance(run).try_number == 2
    base = base_submission_id("glm_infill", logical)
    assert jobs_under(client, base) == [base, f"{base}-retry1"]
    assert xcom(run, "summary")["reason"] == "storage unreachable"


def test_a_config_error_fails_at_once(infill_dag, airflow_home, ray_connection, client):
    """The real pipeline with a config it cannot read exits 2: no retry, one attempt."""
    logical = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    run = run_dag(infill_dag, logical, retries=2, config=str(airflow_home / "missing.yaml"),
                  output_prefix=str(airflow_home / "out"))
    assert run.state == "failed" and task_instance(run).try_number == 1
    base = base_submission_id("glm_infill", logical)
    assert jobs_under(client, base) == [base]
    assert client.get_job_info(base).entrypoint == infill_entrypoint(
        str(airflow_home / "missing.yaml"), str(airflow_home / "out"), logical)
    summary = xcom(run, "summary")
    assert summary["exit_code"] == 2 and "missing.yaml" in summary["reason"]


def test_the_connection_token_authenticates_and_a_refused_one_fails_at_once(
        infill_dag, token_ray_head, fake_job, monkeypatch, capfd):
    """The connection's password is the token; a wrong token or a missing connection fails
    the task without retries (retries=2, one try)."""
    fake_job(job_with_result(0))
    set_connection(monkeypatch, "ray_token_ok", token_ray_head.address, token_ray_head.token)
    logical = dt.datetime(2026, 2, 5, tzinfo=dt.UTC)
    assert run_dag(infill_dag, logical, ray_conn_id="ray_token_ok").state == "success"
    set_connection(monkeypatch, "ray_token_bad", token_ray_head.address, "not-the-token")
    capfd.readouterr()
    refused = run_dag(infill_dag, logical, retries=2, ray_conn_id="ray_token_bad")
    assert refused.state == "failed" and task_instance(refused).try_number == 1
    assert "the Ray cluster refused the connection's token" in capfd.readouterr().out
    missing = run_dag(infill_dag, logical, retries=2, ray_conn_id="no_such_connection")
    assert missing.state == "failed" and task_instance(missing).try_number == 1
    assert "no_such_connection` isn't defined" in capfd.readouterr().out
    token_client = make_client(token_ray_head.address, token_ray_head.token)
    base = base_submission_id("glm_infill", logical)
    assert jobs_under(token_client, base) == [base]


def test_dag_run_infills_one_partition_reruns_only_when_forced(infill_dag, ray_connection,
                                                               client, small_model, tmp_path,
                                                               capfd):
    """`dag.test()` end to end with the real pipeline: a few sample rows through Ray; the same
    interval again does nothing (and says so when the params changed); `force` redoes it."""
    rows = (ROOT / "data" / "sample" / "masked" / "part-000.jsonl").read_text().splitlines()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_text("\n".join(rows[:4]) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"paths": str(tmp_path / "in")}, "output": {"path": "overridden"},
        "model": {"path": str(small_model)}, "sampling": {"max_new_tokens": 2},
        "resources": {"batch_size": 4}}))
    logical = dt.datetime(2026, 2, 2, 6, 0, tzinfo=dt.UTC)
    conf = {"config": str(config), "output_prefix": str(tmp_path / "out")}
    first = run_dag(infill_dag, logical, **conf)
    assert first.state == "success"
    partition = tmp_path / "out" / "dt=2026-02-02"
    manifest = json.loads((partition / "_manifest.json").read_text())
    assert (manifest["status"], manifest["rows_in"]) == ("succeeded", 4)
    summary = xcom(first, "summary")
    assert (summary["rows_in"], summary["output"]) == (4, str(partition))
    base = base_submission_id("glm_infill", logical)
    assert jobs_under(client, base) == [base]
    # the same interval with other params: nothing runs, and the task log says why
    changed = {**conf, "overrides": ["sampling.max_new_tokens=3"]}
    capfd.readouterr()
    assert run_dag(infill_dag, logical, **changed).state == "success"
    assert "NOT re-running" in capfd.readouterr().out
    assert jobs_under(client, base) == [base]
    # force: a new attempt redoes the partition with the new params
    assert run_dag(infill_dag, logical, force=True, **changed).state == "success"
    assert jobs_under(client, base) == [base, f"{base}-retry1"]
    assert client.get_job_info(f"{base}-retry1").entrypoint.endswith(" --overwrite")
    redone = json.loads((partition / "_manifest.json").read_text())
    assert redone["status"] == "succeeded" and redone["config_hash"] != manifest["config_hash"]

"""Run the infill job on a Ray cluster through the Ray Jobs API: submit once, wait, fail loudly.

Plain functions, no Airflow import, so the DAG (`jobs/airflow_dag.py`) stays a thin shell and
the logic is tested against a real Ray head.

Idempotency: a run of the scheduler has one *base* submission id (dag id + logical date),
the same for every try. Attempt 0 is submitted under the base id, later attempts under
`<base>-retry<N>`. Before submitting, `ensure_submitted` looks up the latest attempt:
SUCCEEDED -> nothing to submit; PENDING/RUNNING -> wait for that job instead of starting a
second one; FAILED/STOPPED -> submit the next attempt. The job itself writes one output
partition per data interval and resumes from the work units it already committed, so a new
attempt never duplicates rows.
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
import time
from collections.abc import Sequence
from typing import Any

from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

RETRY_SUFFIX = "-retry"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class RayJobFailed(RuntimeError):
    """The Ray job ended FAILED or STOPPED; the message carries the tail of its logs."""


def make_client(address: str, token: str | None = None) -> JobSubmissionClient:
    """A Jobs API client; `token` is the cluster's auth token (Ray 2.60 enables token auth)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def base_submission_id(dag_id: str, logical_date: dt.datetime | str) -> str:
    """The same id for every try of one scheduled run; safe in the Jobs API's URLs."""
    stamp = (logical_date.strftime("%Y%m%dT%H%M%S") if isinstance(logical_date, dt.datetime)
             else str(logical_date))
    return _UNSAFE.sub("_", f"{dag_id}__{stamp}")


def attempt_id(base: str, attempt: int) -> str:
    return base if attempt == 0 else f"{base}{RETRY_SUFFIX}{attempt}"


def infill_entrypoint(config: str, output_prefix: str, interval_start: dt.date,
                      overrides: Sequence[str] = ()) -> str:
    """`python -m jobs.run_infill CONFIG --set output.path=<prefix>/dt=YYYY-MM-DD ...`."""
    output = f"{output_prefix.rstrip('/')}/dt={interval_start:%Y-%m-%d}"
    sets = [arg for override in overrides for arg in ("--set", override)]
    return shlex.join(["python", "-m", "jobs.run_infill", config,
                       "--set", f"output.path={output}", *sets])


def find_job(client: JobSubmissionClient, submission_id: str) -> JobDetails | None:
    """The job's details, or None if the cluster has no job with that id."""
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as err:
        if "status code 404" in str(err):
            return None
        raise


def latest_attempt(client: JobSubmissionClient, base: str) -> tuple[int, JobDetails | None]:
    """The highest attempt number that exists under `base`, with its details."""
    attempt, latest = 0, find_job(client, base)
    while latest is not None:
        following = find_job(client, attempt_id(base, attempt + 1))
        if following is None:
            break
        attempt, latest = attempt + 1, following
    return attempt, latest


def ensure_submitted(client: JobSubmissionClient, base: str, entrypoint: str,
                     **submit_options: Any) -> str:
    """The submission id to wait for: an attempt that succeeded or still runs, else a new one.

    `submit_options` go to `JobSubmissionClient.submit_job` (runtime_env, metadata,
    entrypoint_num_cpus, ...).
    """
    attempt, latest = latest_attempt(client, base)
    if latest is not None and latest.status not in (JobStatus.FAILED, JobStatus.STOPPED):
        return latest.submission_id
    submission_id = attempt_id(base, attempt + 1 if latest is not None else 0)
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=submission_id, **submit_options)
    except RuntimeError as err:
        if "already exists" not in str(err):
            raise
        # a concurrent try submitted the same attempt first: waiting for it is right
    return submission_id


def wait_for_job(client: JobSubmissionClient, submission_id: str, poll_s: float = 10.0,
                 timeout_s: float | None = None) -> JobStatus:
    """Poll until the job is terminal. A timeout leaves the job running for the next try."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not (status := client.get_job_status(submission_id)).is_terminal():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"Ray job {submission_id} still {status} after {timeout_s}s")
        time.sleep(poll_s)
    return status


def logs_tail(client: JobSubmissionClient, submission_id: str, lines: int = 50) -> str:
    """The last `lines` lines of the job's driver log."""
    return "\n".join(client.get_job_logs(submission_id).splitlines()[-lines:])


def run_job(client: JobSubmissionClient, base: str, entrypoint: str, poll_s: float = 10.0,
            timeout_s: float | None = None, log_lines: int = 50, **submit_options: Any) -> str:
    """Submit (idempotently), wait, and raise `RayJobFailed` unless the job succeeded."""
    submission_id = ensure_submitted(client, base, entrypoint, **submit_options)
    status = wait_for_job(client, submission_id, poll_s, timeout_s)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(submission_id)
        raise RayJobFailed(
            f"Ray job {submission_id} {status}: {info.message}\n"
            f"--- last {log_lines} log lines ---\n{logs_tail(client, submission_id, log_lines)}")
    return submission_id

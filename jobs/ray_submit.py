"""Run the infill job on a Ray cluster through the Ray Jobs API: submit once, wait, fail loudly.

Plain functions, no Airflow import, so the Airflow operator (`jobs/airflow_ray.py`) stays a
thin shell and the logic is tested against a real Ray head.

Idempotency: a run of the scheduler has one *base* submission id (dag id + logical date),
the same for every try. Attempt 0 is submitted under the base id, later attempts under
`<base>-retry<N>`. Before submitting, `ensure_submitted` looks up the latest attempt:
SUCCEEDED -> nothing to submit; PENDING/RUNNING -> wait for that job instead of starting a
second one; FAILED/STOPPED -> submit the next attempt. The job itself writes one output
partition per data interval and resumes from the work units it already committed, so a new
attempt never duplicates rows. A *forced* run redoes the partition once (`--overwrite`), then
its own retries resume as usual.

Outcome: every `glm-infill run` ends its log with `[glm-infill] result {JSON}` (status,
exit_code, reason, output, totals); `job_outcome` reads it, so a caller knows why a job failed
and whether running it again could help.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import shlex
import time
from collections.abc import Sequence
from typing import Any

from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from pipeline.job.result import find_result

RETRY_SUFFIX = "-retry"
OVERWRITE_FLAG = "--overwrite"
FORCE_KEY = "glm_infill_force"  # job metadata: the forced run that submitted the attempt
# exit codes of `glm-infill run` that the same inputs give again: running again cannot help
FINAL_EXIT_CODES = {1: "the data did not pass", 2: "usage or config error"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class RayJobFailed(RuntimeError):
    """The Ray job ended FAILED or STOPPED; the message carries the tail of its logs."""


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
                     force_key: str | None = None, **submit_options: Any) -> str:
    """The submission id to wait for: an attempt that succeeded or still runs, else a new one.

    `force_key` names a forced run (e.g. Airflow run id + clear number): unless the latest
    attempt was submitted under that key, a new attempt with `--overwrite` replaces even one
    that succeeded; attempts carry the key in their metadata, so the forced run's retries
    resume its attempt instead of starting over. A job that still runs is always waited for:
    two jobs never write one partition. `submit_options` go to `JobSubmissionClient.submit_job`
    (runtime_env, metadata, entrypoint_num_cpus, ...).
    """
    attempt, latest = latest_attempt(client, base)
    if latest is not None and not latest.status.is_terminal():
        return latest.submission_id
    forcing = force_key is not None and (latest is None
                                         or (latest.metadata or {}).get(FORCE_KEY) != force_key)
    if latest is not None and latest.status == JobStatus.SUCCEEDED and not forcing:
        return latest.submission_id
    if force_key is not None:
        metadata = submit_options.get("metadata") or {}
        submit_options["metadata"] = {**metadata, FORCE_KEY: force_key}
    if forcing:
        entrypoint = f"{entrypoint} {OVERWRITE_FLAG}"
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


def same_command(entrypoint: str, other: str) -> bool:
    """Whether two entrypoints run the same job on the same partition (`--overwrite` aside)."""
    def words(command: str) -> list[str]:
        return [word for word in shlex.split(command) if word != OVERWRITE_FLAG]
    return words(entrypoint) == words(other)


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """A terminal job as a scheduler needs it: Ray's status, the job's result line, its log."""

    submission_id: str
    status: str  # Ray's JobStatus: SUCCEEDED, FAILED, STOPPED
    message: str | None  # Ray's note, e.g. "Job entrypoint command failed with exit code 2"
    result: dict[str, Any] | None  # the result line's payload
    log_tail: str

    @property
    def succeeded(self) -> bool:
        return self.status == JobStatus.SUCCEEDED

    @property
    def final_reason(self) -> str | None:
        """Why running the job again cannot help (its exit code says so), else None: an
        infrastructure failure, an interruption or a job that died without a result resumes."""
        return FINAL_EXIT_CODES.get((self.result or {}).get("exit_code"))

    def summary(self) -> dict[str, Any]:
        """The result line (or what Ray knows when there is none), with the job's id."""
        known = self.result or {"status": "succeeded" if self.succeeded else "failed",
                                "exit_code": None, "reason": self.message}
        return {**known, "submission_id": self.submission_id, "ray_status": self.status}

    def failure(self) -> str:
        reason = (self.result or {}).get("reason") or self.message
        lines = len(self.log_tail.splitlines())
        return (f"Ray job {self.submission_id} {self.status}: {reason}\n"
                f"--- last {lines} log lines ---\n{self.log_tail}")


def job_outcome(client: JobSubmissionClient, submission_id: str,
                log_lines: int = 50) -> JobOutcome:
    """What a terminal job did, from its details and its driver log."""
    info = client.get_job_info(submission_id)
    logs = client.get_job_logs(submission_id)
    return JobOutcome(submission_id, str(info.status), info.message, find_result(logs),
                      "\n".join(logs.splitlines()[-log_lines:]))


def run_job(client: JobSubmissionClient, base: str, entrypoint: str, poll_s: float = 10.0,
            timeout_s: float | None = None, log_lines: int = 50, **submit_options: Any) -> str:
    """Submit (idempotently), wait, and raise `RayJobFailed` unless the job succeeded."""
    submission_id = ensure_submitted(client, base, entrypoint, **submit_options)
    wait_for_job(client, submission_id, poll_s, timeout_s)
    outcome = job_outcome(client, submission_id, log_lines)
    if not outcome.succeeded:
        raise RayJobFailed(outcome.failure())
    return submission_id

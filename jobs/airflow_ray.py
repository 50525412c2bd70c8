"""Airflow 3 pieces that run the infill job on Ray: `RayInfillOperator` and `RayJobTrigger`.

The operator submits this interval's job (idempotently, `jobs/ray_submit.py`) and defers: the
wait runs in the triggerer, so a job of hours holds no worker slot. When the job ends the task
resumes on a worker, writes the job's log tail and summary to the task log and to XCom, and
fails if the job failed: at once, without retries, when running again cannot help (a missing
connection, a token the cluster refuses, a config or data error: exit code 2 or 1), otherwise
through Airflow's retries, which resume the job.

The cluster is an Airflow Connection (`cluster_address`): the Ray dashboard's host and port,
and the cluster's auth token as its password.

Ray is imported only where a task or a trigger runs, never at import: the DAG processor imports
this module each time it parses the DAG file.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook, BaseOperator, Connection
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException
from airflow.triggers.base import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from airflow.sdk import Context
    from ray.job_submission import JobSubmissionClient

DEFAULT_DASHBOARD_PORT = 8265


def cluster_address(conn: Connection) -> str:
    """The Jobs API address of a connection: `<schema or http>://<host>:<port or 8265>`, or the
    host as written when it is a whole `http(s)://...` address (plus the port if one is set)."""
    if not conn.host:
        raise AirflowFailException(f"Airflow connection {conn.conn_id!r} has no host: set it to "
                                   "the Ray dashboard's host (docs/airflow.md)")
    if "://" in conn.host:
        return conn.host.rstrip("/") + (f":{conn.port}" if conn.port else "")
    return f"{conn.schema or 'http'}://{conn.host}:{conn.port or DEFAULT_DASHBOARD_PORT}"


def ray_client(conn: Connection) -> JobSubmissionClient:
    """A Jobs API client for the connection's cluster, sending its password as the token."""
    from pipeline.job.cluster import make_client

    return make_client(cluster_address(conn), conn.password or None)


def not_retryable(err: BaseException) -> str | None:
    """Why running again cannot fix this error, or None when it may be passing (the cluster
    down or restarting)."""
    from ray.exceptions import AuthenticationError

    if isinstance(err, AirflowNotFoundException):
        return f"{err}: add the Ray cluster's connection (docs/airflow.md)"
    if isinstance(err, AuthenticationError):
        return f"the Ray cluster refused the connection's token: {err.message}"
    return None


@contextlib.contextmanager
def failing_at_once() -> Iterator[None]:
    """Turn errors that retries cannot fix into `AirflowFailException` (no retries)."""
    try:
        yield
    except Exception as err:
        if reason := not_retryable(err):
            raise AirflowFailException(reason) from err
        raise


class RayJobTrigger(BaseTrigger):
    """Polls a Ray job from the triggerer until it ends. Fires once, with the job's final
    status, or with the error that stopped the polling and whether a retry may get past it."""

    def __init__(self, conn_id: str, submission_id: str, poll_seconds: float) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.submission_id = submission_id
        self.poll_seconds = poll_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"conn_id": self.conn_id, "submission_id": self.submission_id,
                 "poll_seconds": self.poll_seconds})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        event: dict[str, Any] = {"submission_id": self.submission_id}
        try:
            event["status"] = await self._final_status()
        except Exception as err:  # reported to the task, which fails or retries
            reason = not_retryable(err)
            event.update(error=reason or f"{type(err).__name__}: {err}",
                         retryable=reason is None)
        yield TriggerEvent(event)

    async def _final_status(self) -> str:
        """The blocking Jobs API client runs in threads: the triggerer's loop serves many."""
        conn = await BaseHook.aget_connection(self.conn_id)
        client = await asyncio.to_thread(ray_client, conn)
        seen = None
        while True:
            status = await asyncio.to_thread(client.get_job_status, self.submission_id)
            if status != seen:
                self.log.info("Ray job %s is %s", self.submission_id, status.value)
                seen = status
            if status.is_terminal():
                return status.value
            await asyncio.sleep(self.poll_seconds)


def partition_start(context: Context) -> dt.datetime:
    """The date of the run's output partition: its data interval's start (a manual run may
    have no data interval or logical date)."""
    return (context.get("data_interval_start") or context.get("logical_date")
            or context["dag_run"].run_after)


def force_key(context: Context) -> str | None:
    """With the `force` param: this run, once per clearing (a cleared run forces again)."""
    if not context["params"]["force"]:
        return None
    return f"{context['run_id']}#clear{context['dag_run'].clear_number}"


class RayInfillOperator(BaseOperator):
    """Runs the interval's infill job on Ray (module doc). Its settings are the DAG's params:
    `config`, `output_prefix`, `overrides`, `ray_conn_id`, `working_dir`, `force`,
    `poll_seconds`; `job_timeout` bounds the wait (the job itself keeps running)."""

    def __init__(self, *, job_timeout: dt.timedelta = dt.timedelta(hours=24),
                 log_lines: int = 50, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job_timeout = job_timeout
        self.log_lines = log_lines

    def execute(self, context: Context) -> dict[str, Any]:
        from jobs.ray_submit import base_submission_id, ensure_submitted, infill_entrypoint

        params = context["params"]
        entrypoint = infill_entrypoint(params["config"], params["output_prefix"],
                                       partition_start(context), params["overrides"])
        base = base_submission_id(context["dag"].dag_id,
                                  context.get("logical_date") or context["run_id"])
        runtime_env = {"working_dir": params["working_dir"]} if params["working_dir"] else None
        with failing_at_once():
            client = ray_client(Connection.get(params["ray_conn_id"]))
            submission_id = ensure_submitted(
                client, base, entrypoint, force_key=force_key(context), runtime_env=runtime_env,
                metadata={"dag_id": context["dag"].dag_id, "run_id": context["run_id"]})
            job = client.get_job_info(submission_id)
        if job.status.value == "SUCCEEDED":  # an attempt that succeeded before: no wait
            self._explain_reuse(submission_id, job.entrypoint, entrypoint)
            return self._finish(context, submission_id)
        self.log.info("Ray job %s is %s; waiting in the triggerer", submission_id,
                      job.status.value)
        self.defer(trigger=RayJobTrigger(params["ray_conn_id"], submission_id,
                                         float(params["poll_seconds"])),
                   method_name="execute_complete", timeout=self.job_timeout)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resumed by the trigger's event: the job ended, or the wait broke off."""
        if "error" in event:
            message = f"Waiting for Ray job {event['submission_id']} failed: {event['error']}"
            if event["retryable"]:
                raise RuntimeError(message)
            raise AirflowFailException(message)
        return self._finish(context, event["submission_id"])

    def _explain_reuse(self, submission_id: str, submitted: str, wanted: str) -> None:
        """A re-run that changes nothing must say so, and say how to redo the partition."""
        from jobs.ray_submit import same_command

        if same_command(submitted, wanted):
            self.log.info("Ray job %s already succeeded for this run: nothing to do (the param "
                          "force=true redoes the partition)", submission_id)
        else:
            self.log.warning("Ray job %s already succeeded for this run with another command; "
                             "NOT re-running it. It ran: %s. The params now give: %s. Trigger "
                             "with force=true to redo the partition.", submission_id, submitted,
                             wanted)

    def _finish(self, context: Context, submission_id: str) -> dict[str, Any]:
        """Log and push the job's log tail and summary; raise unless the job succeeded."""
        from jobs.ray_submit import RayJobFailed, job_outcome

        with failing_at_once():
            client = ray_client(Connection.get(context["params"]["ray_conn_id"]))
            outcome = job_outcome(client, submission_id, self.log_lines)
        summary = outcome.summary()
        self.log.info("Ray job %s %s. Last %d lines of its log:\n%s", submission_id,
                      outcome.status, len(outcome.log_tail.splitlines()), outcome.log_tail)
        self.log.info("Summary: %s", json.dumps(summary))
        context["ti"].xcom_push(key="summary", value=summary)
        context["ti"].xcom_push(key="log_tail", value=outcome.log_tail)
        if outcome.succeeded:
            return summary
        if outcome.final_reason:
            raise AirflowFailException(f"{outcome.final_reason}; a retry would fail the same "
                                       f"way. {outcome.failure()}")
        raise RayJobFailed(outcome.failure())

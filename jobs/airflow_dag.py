"""Airflow 3 DAG `glm_infill`: one infill job per data interval, run on a Ray cluster.

Each run submits `python -m jobs.run_infill CONFIG --set output.path=<prefix>/dt=<YYYY-MM-DD>`
(the data interval's start) through the Ray Jobs API and waits for it; the task fails with the
tail of the job's log when the job fails. Retries are safe: the submission id comes from the
dag id and the logical date (see `jobs/ray_submit.py`), so a retry waits for a job that still
runs, does nothing after one that succeeded, and resubmits after one that failed; the
pipeline resumes from the work units it already committed.

Where the cluster is: the `ray_address` param (trigger form), else the Airflow Variable
`glm_infill_ray_address`, else `http://127.0.0.1:8265`. A token-authenticated cluster
(Ray 2.60's default) needs its token in the Variable `glm_infill_ray_token` (keep it in a
secrets backend). The Airflow workers need `glm-infill[airflow]` installed; the Ray cluster
needs the project (see `cluster.yaml`), or a `working_dir` to upload.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import Param, Variable, dag, task

DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"


@dag(
    dag_id="glm_infill",
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,  # one job at a time keeps the cluster's GPUs on one interval
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=5)},
    params={
        "config": Param("jobs/default.yaml", type="string",
                        description="job YAML, local to the Ray job or s3:// gs:// az://"),
        "output_prefix": Param("output/glm-infill", type="string",
                               description="each interval writes <prefix>/dt=YYYY-MM-DD"),
        "overrides": Param([], type="array", description="extra --set key.sub=value"),
        "ray_address": Param(None, type=["null", "string"],
                             description="Ray dashboard address (Jobs API)"),
        "working_dir": Param(None, type=["null", "string"],
                             description="runtime_env working_dir to upload with the job"),
        "poll_seconds": Param(30, type="number", minimum=0.1),
    },
    tags=["glm-infill", "ray"],
)
def glm_infill() -> None:
    @task(execution_timeout=dt.timedelta(hours=24))
    def run_infill(**context: Any) -> str:
        """Submit or find this interval's Ray job and wait until it is done."""
        # imported here so that parsing the DAG file does not import Ray
        from jobs.ray_submit import base_submission_id, infill_entrypoint, make_client, run_job

        params = context["params"]
        address = params["ray_address"] or Variable.get("glm_infill_ray_address",
                                                        default=DEFAULT_RAY_ADDRESS)
        token = Variable.get("glm_infill_ray_token", default=None)
        logical_date = context.get("logical_date")  # None for some manual runs in Airflow 3
        start = (context.get("data_interval_start") or logical_date
                 or context["dag_run"].run_after)
        dag_id = context["dag"].dag_id
        base = base_submission_id(dag_id, logical_date or context["run_id"])
        entrypoint = infill_entrypoint(params["config"], params["output_prefix"], start,
                                       params["overrides"])
        runtime_env = {"working_dir": params["working_dir"]} if params["working_dir"] else None
        return run_job(make_client(address, token), base, entrypoint,
                       poll_s=params["poll_seconds"], runtime_env=runtime_env,
                       metadata={"dag_id": dag_id, "run_id": context["run_id"]})

    run_infill()


glm_infill()

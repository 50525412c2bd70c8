"""Airflow 3 DAG `glm_infill`: one infill job per data interval, run on a Ray cluster.

Each run submits `python -m jobs.run_infill CONFIG --set output.path=<prefix>/dt=<YYYY-MM-DD>`
(the data interval's start) through the Ray Jobs API and waits for it in the triggerer
(`jobs/airflow_ray.py`): no worker slot is held while the job runs. The task log and XCom
(`summary`, `log_tail`) get the job's result and the tail of its log.

Retries are for failures that may pass (the cluster down, an infrastructure failure of the
job: exit code 3); they resume the job from the work units it committed. A missing connection,
a token the cluster refuses, a config error (exit 2) or data that did not pass (exit 1) fail
the task at once. Retries are idempotent: the submission id comes from the dag id and the
logical date (`jobs/ray_submit.py`), so a retry waits for a job that still runs and does
nothing after one that succeeded; the param `force` redoes the partition (`--overwrite`).

Set-up (docs/airflow.md): the Connection `glm_infill_ray` (the Ray dashboard's host and port,
the cluster's token as password), a running triggerer, `glm-infill[airflow]` installed where
Airflow runs, and the project on the Ray cluster (see `cluster.yaml`) or a `working_dir`.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, dag

from jobs.airflow_ray import RayInfillOperator

DEFAULT_CONN_ID = "glm_infill_ray"


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
        "ray_conn_id": Param(DEFAULT_CONN_ID, type="string",
                             description="Airflow connection of the Ray cluster (Jobs API "
                                         "address, token as password)"),
        "working_dir": Param(None, type=["null", "string"],
                             description="runtime_env working_dir to upload with the job"),
        "force": Param(False, type="boolean",
                       description="redo the partition (--overwrite) even if a job already "
                                   "succeeded for this run"),
        "poll_seconds": Param(30, type="number", minimum=0.1,
                              description="how often the triggerer asks Ray for the status"),
    },
    tags=["glm-infill", "ray"],
)
def glm_infill() -> None:
    # execution_timeout bounds the worker's part (submit, read the log); job_timeout the wait
    RayInfillOperator(task_id="run_infill", execution_timeout=dt.timedelta(minutes=10),
                      job_timeout=dt.timedelta(hours=24))


glm_infill()

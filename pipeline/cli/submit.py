"""`glm-infill submit`: send a job to a Ray cluster through the Jobs API, like `ray job submit`,
with what that command cannot know about a glm-infill job.

* The config is loaded and validated here first: a mistake is one line and exit 2 before
  anything reaches the cluster.
* Relative paths resolve on the submitter's machine (in the config file: against the file; in
  `--set`: against the working directory) and the job gets the resolved config inline, so no
  path ends up inside Ray's temporary copy of a working_dir. Use absolute paths on shared
  storage or object-storage URIs for a remote cluster.
* The submission carries metadata (`glm_infill_config_hash`, `glm_infill_output`,
  `glm_infill_version`), visible in `ray job list` and the dashboard.
* The address is the dashboard's (`http://host:8265`; `--address`, else RAY_ADDRESS, else
  the local default). Token authentication (Ray's default since 2.60):
  the token comes from RAY_AUTH_TOKEN, the file in RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token
  (where `ray start` keeps it), and is never printed.
* By default it waits, streaming the job's log, and exits with the job's own exit code (read
  from its result line); `--no-wait` prints the submission id and returns.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pipeline.cli.flags import usage_error
from pipeline.cli.run import add_arguments

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
POLL_S = 2.0
STOPPED_EXIT = 130  # the job was stopped (ray job stop), as for an interrupted run
LOST_EXIT = 3  # the job failed without its result line (its driver died): infrastructure


def add_parser(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit", help="submit a job to a Ray cluster (Jobs API) and follow it",
        description=__doc__.split("\n\n")[0].replace("\n", " "), allow_abbrev=False)
    submit.set_defaults(handler=main)
    add_arguments(submit)
    submit.add_argument("--address", help="the cluster's dashboard, http://host:8265 (default: "
                        f"RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    submit.add_argument("--working-dir", help="a directory to upload as the job's working_dir "
                        "(code not installed on the cluster); paths were resolved before")
    submit.add_argument("--submission-id", help="the job's id (default: Ray chooses one)")
    submit.add_argument("--no-wait", action="store_true",
                        help="return after submitting instead of following the job")


def _fail(message: str) -> NoReturn:
    usage_error("submit", message)


def dashboard_address(given: str | None) -> str:
    """`--address`, else RAY_ADDRESS (a dashboard URL, or a cluster address that Ray's client
    looks the dashboard up for), else the local default."""
    return given or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def auth_token() -> str | None:
    """The cluster token where Ray's own clients look for it, or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def connect(address: str) -> JobSubmissionClient:
    """A Jobs API client; an unreachable or refusing cluster is one line, not a traceback."""
    from pipeline.job.cluster import make_client

    token = auth_token()
    try:
        return make_client(address, token)
    except Exception as err:  # unreachable, refused, a wrong token: Ray raises several kinds
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = ("" if token else "; if the cluster uses token authentication, set "
                "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
        _fail(f"cannot reach the Ray Jobs API at {address}: {cause}{hint}")


def follow(client: JobSubmissionClient, submission_id: str) -> int:
    """Stream the job's log until it ends; the job's exit code."""
    from ray.job_submission import JobStatus

    from pipeline.job.result import find_result

    shown = 0
    while True:
        status = client.get_job_status(submission_id)
        log = client.get_job_logs(submission_id)
        sys.stdout.write(log[shown:])
        sys.stdout.flush()
        shown = len(log)
        if status.is_terminal():
            break
        time.sleep(POLL_S)
    result = find_result(log)
    if result is not None:
        return int(result["exit_code"])
    if status == JobStatus.STOPPED:
        return STOPPED_EXIT
    return 0 if status == JobStatus.SUCCEEDED else LOST_EXIT


def main(args: argparse.Namespace) -> int:
    from pipeline.job.config import ConfigError, load_config
    from pipeline.job.runner import PREFIX, default_config_path

    overrides = args.overrides + (["output.overwrite=true"] if args.overwrite else [])
    try:
        config = load_config(args.config or default_config_path(), overrides)
    except ConfigError as err:
        _fail(str(err))
    address = dashboard_address(args.address)
    client = connect(address)
    runtime_env = {"working_dir": args.working_dir} if args.working_dir else None
    entrypoint = shlex.join(["python", "-m", "jobs.run_infill",
                             json.dumps(config.model_dump(mode="json"))])
    metadata = {"glm_infill_config_hash": config.config_hash(),
                "glm_infill_output": config.output.path,
                "glm_infill_version": importlib.metadata.version("glm-infill")}
    try:
        submission_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                          metadata=metadata, submission_id=args.submission_id)
    except RuntimeError as err:
        _fail(f"the cluster refused the job: {str(err).splitlines()[0]}")
    print(f"{PREFIX} submitted {submission_id} to {address}; output {config.output.path}",
          flush=True)
    if args.no_wait:
        print(f"{PREFIX} follow it with: ray job logs --follow --address {address} "
              f"{submission_id}", flush=True)
        return 0
    return follow(client, submission_id)

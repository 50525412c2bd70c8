"""Where a job runs: the Ray cluster it joins or starts, and whether its driver is a Ray job
(`ray job submit`) running in a copy of a working_dir."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

from pipeline.job.config import ConfigError, JobConfig

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def cluster_address(config: JobConfig) -> str | None:
    """The cluster to join (`ray.address`, else RAY_ADDRESS); None starts a local one. A
    dashboard URL is the Jobs API's address, not a driver's: explained, not attempted."""
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{address} is a Ray dashboard (Jobs API) address; a driver joins a cluster by "
            "its GCS address (host:6379, or `auto` on one of its nodes). To send this job to "
            f"that dashboard: glm-infill submit --address {address} CONFIG")
    return address or None


def connect(config: JobConfig) -> None:
    """Join the configured or current cluster; otherwise start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(config)
    if address:
        try:
            ray.init(address=address, log_to_driver=config.ray.log_to_driver)
        except (ConnectionError, RuntimeError) as err:
            hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
                "; if it uses token authentication, set RAY_AUTH_MODE=token with the token in "
                "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (docs/ray.md)")
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConnectionError(f"cannot join the Ray cluster at {address} ({first})"
                                  f"{hint}") from None
        return
    # Ray turns token authentication on for a new local cluster (good) and warns about it on
    # every run (noise: nothing for the user to do). The mode cannot be set from here once
    # Ray is imported (its C++ side has read it), so the warning is filtered instead.
    logging.getLogger(AUTH_LOGGER).setLevel(logging.ERROR)
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False,
             log_to_driver=config.ray.log_to_driver)


def ray_job_working_dir() -> str | None:
    """The directory this driver runs in if it is a Ray job submitted with a working_dir (Ray
    passes the job's runtime env to its driver in RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if (job_config.get("runtime_env") or {}).get("working_dir"):
        return os.getcwd()
    return None


def make_client(address: str, token: str | None = None) -> JobSubmissionClient:
    """A Jobs API client; `token` is the cluster's auth token (Ray 2.60 enables token auth),
    sent as a bearer header."""
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)

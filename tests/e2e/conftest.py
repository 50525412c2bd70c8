"""Fixtures of the end-to-end tests: a SeaweedFS S3 server and ONE real Ray head for the session.

* The S3 keys are constants, so they go into the environment here, at import, before any Ray
  process exists: the head (started by whichever test needs it first) and so every worker and
  every `ray job submit` driver inherit them, as on a real cluster. The endpoint is known only
  once the server runs: tests pass it in the job config (`source.storage.endpoint_url`), and the
  `s3` fixture sets AWS_ENDPOINT_URL in this process for the clients the driver opens itself
  (boto3, smart-open reading a config from s3://).
* `s3` starts SeaweedFS only when a test asks for it; Ray does not depend on it.
* `ray_head` is one `ray start --head` for every test that needs Ray: the Airflow DAG and
  `ray job submit` use its Jobs API (`ray_address`), in-process jobs join it as a driver
  (`ray_cluster`), jobs in a subprocess get its address in RAY_ADDRESS (`ray_env`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest

from tests.e2e.ray_head import VLLM_CPU_ENV, RayHead, local_ray_head
from tests.e2e.s3 import CREDENTIALS, SeaweedS3

os.environ.update(CREDENTIALS)

# 4 logical CPUs on 2 cores: the pipeline's fractional actors must not starve its reads, and an
# Airflow-submitted job's driver needs a CPU beside them.
HEAD_CPUS = 4


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", server.endpoint)  # this process's own clients only
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """The session's Ray head (auth off, its own ports); stopped however the session ends.

    Its environment never holds an S3 endpoint, whichever fixture started first: workers must
    get it from the job config, as they would on a real cluster."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # the client side must agree with the head
        env.delenv("RAY_ADDRESS", raising=False)
        with local_ray_head(num_cpus=HEAD_CPUS, timeout_s=120,
                            env={**VLLM_CPU_ENV, "AWS_ENDPOINT_URL": None,
                                 "AWS_ENDPOINT_URL_S3": None}) as head:
            yield head


@pytest.fixture(scope="session")
def ray_address(ray_head: RayHead) -> str:
    """The head's Jobs API address (`ray job submit --address`, the Airflow DAG)."""
    return ray_head.address


@pytest.fixture(scope="session")
def ray_cluster(ray_head: RayHead) -> Iterator[RayHead]:
    """This process joined to the head as a driver, for jobs run in-process (`InfillJob.run`
    finds Ray initialised and uses it)."""
    import ray

    assert not ray.is_initialized(), "Ray was started in this process before: e2e jobs must " \
        "run on the shared head"
    ray.init(address=ray_head.gcs_address)
    try:
        yield ray_head
    finally:
        ray.shutdown()


@pytest.fixture
def ray_env(ray_head: RayHead) -> dict[str, str]:
    """The environment of a job driver run in a subprocess: it joins the shared head."""
    return {**os.environ, "RAY_ADDRESS": ray_head.gcs_address}


@dataclasses.dataclass(frozen=True)
class TokenHead:
    address: str  # the Jobs API
    token: str


@pytest.fixture(scope="session")
def token_ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenHead]:
    """A second head with token authentication (Ray 2.60's default for real clusters): the
    token only in its environment and HOME a temporary folder, so nothing reads or writes
    ~/.ray. This process stays a client with auth mode off: a test sends a token itself."""
    token = "glm-infill-test-token-5f2c9e0b7d1a4c38"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        with local_ray_head(num_cpus=1, timeout_s=120, env={
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                "HOME": str(tmp_path_factory.mktemp("home"))}) as head:
            yield TokenHead(head.address, token)

"""Fixtures of the pipeline tests: SeaweedFS S3, a local Ray cluster, a tiny checkpoint.

Order matters: the S3 fixture puts the AWS variables into the environment before Ray starts,
so Ray workers inherit them as they would on a real cluster.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3 import SeaweedS3


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    saved = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def ray_cluster(s3: SeaweedS3) -> Iterator[None]:
    """A local Ray cluster; fractional actors, so 4 logical CPUs are plenty on 2 cores."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-layout checkpoint smaller than the demo one, so jobs run fast on CPU."""
    from pipeline.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("small-glm"), num_layers=1,
                                 hidden_size=128, num_attention_heads=2,
                                 max_sequence_length=128)

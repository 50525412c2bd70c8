"""cluster.yaml: valid for Ray's cluster launcher and shaped for glm-10b on 80 GB GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
GLM_10B_BF16_GB = 20
GPU_INSTANCE_MEMORY_GB = {"p5.48xlarge": 80, "p4de.24xlarge": 80}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def gpu_types(cluster: dict) -> dict[str, dict]:
    return {name: spec for name, spec in cluster["available_node_types"].items()
            if spec.get("resources", {}).get("GPU")}


def test_ray_accepts_it(cluster):
    """The launcher's own steps: fill in the provider defaults, check against its schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))


def test_required_keys(cluster):
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types",
                "head_node_type", "file_mounts", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in cluster, key
    assert cluster["provider"]["type"] == "aws"
    assert cluster["head_node_type"] in cluster["available_node_types"]


def test_head_is_a_cpu_node_that_takes_no_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert not head.get("resources", {}).get("GPU")
    assert head["resources"]["CPU"] == 0
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))


def test_gpu_workers_autoscale_and_fit_glm_10b(cluster):
    workers = gpu_types(cluster)
    assert workers, "no node type declares GPU resources"
    for name, spec in workers.items():
        instance = spec["node_config"]["InstanceType"]
        assert instance in GPU_INSTANCE_MEMORY_GB, (name, instance)
        assert GPU_INSTANCE_MEMORY_GB[instance] >= 2 * GLM_10B_BF16_GB  # weights + KV cache
        assert 1 <= spec["resources"]["GPU"] <= 8
        assert spec["resources"]["CPU"] >= 8 * spec["resources"]["GPU"]
        assert spec["min_workers"] == 0 < spec["max_workers"] <= cluster["max_workers"]


def test_every_node_installs_the_project_it_was_given(cluster):
    mounted = {target for target, source in cluster["file_mounts"].items() if source == "."}
    installs = [c for c in cluster["setup_commands"] if "pip install" in c and "[gpu]" in c]
    assert len(installs) == 1 and len(mounted) == 1
    assert f"{mounted.pop()}[gpu]" in installs[0]


def test_ray_starts_from_the_project_venv_with_token_auth(cluster):
    for command in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "~/venv/bin/ray start" in command
            assert "RAY_AUTH_MODE=token" in command
    head_start = next(c for c in cluster["head_start_ray_commands"] if "ray start" in c)
    assert any(target in head_start for target in cluster["file_mounts"])  # the token file

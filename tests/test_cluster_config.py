"""The cluster launcher YAMLs pass Ray's own schema validation."""
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "cluster/local.yaml"])
def test_cluster_yaml_validates_against_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / path).read_text())
    validate_config(prepare_config(raw))


def test_schema_rejects_a_broken_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    raw["available_node_types"]["gpu_a10g"]["max_workers"] = "many"
    with pytest.raises(Exception):
        validate_config(prepare_config(raw))


def test_aws_config_has_gpu_workers():
    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert raw["provider"]["type"] == "aws" and raw["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert {"gpu_a10g", "gpu_a10g_x4"} <= set(raw["available_node_types"])


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "cluster/local.yaml"])
def test_both_launchers_copy_the_checkout_lean_and_run_ray_from_its_venv(path):
    """What `cluster/local.yaml` learned running for real (tests/test_two_hosts.py), in both files:
    the copy skips what .gitignore lists (a multi-GB .venv would go to every node), every node gets
    the client's Ray token, the package is installed into a venv from the copied checkout, every Ray
    start puts that venv first on PATH, the dashboard stays on the head's loopback, and a lost node
    is declared dead within seconds."""
    raw = yaml.safe_load((REPO / path).read_text())
    assert raw["rsync_filter"] == [".gitignore"] and ".venv" in (REPO / ".gitignore").read_text()
    assert raw["file_mounts"] == {"~/dard": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    (head,) = [c for c in raw["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head and "RAY_health_check_period_ms=1000" in head
    (setup,) = [c for c in raw["setup_commands"] if "pip install" in c]
    assert "-m venv ~/dard-venv" in setup and "~/dard-venv/bin/pip install -q -e ~/dard" in setup
    for command in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert "ray start" not in command or "PATH=~/dard-venv/bin:$PATH" in command, command

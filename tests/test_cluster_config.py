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


def test_aws_config_installs_this_package_and_has_gpu_workers():
    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert raw["provider"]["type"] == "aws" and raw["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("pip install -e ." in c for c in raw["setup_commands"])
    assert {"gpu_a10g", "gpu_a10g_x4"} <= set(raw["available_node_types"])

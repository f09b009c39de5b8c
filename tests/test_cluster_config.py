"""The cluster launcher YAMLs pass Ray's own schema validation."""
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "cluster/local.yaml"])
def test_cluster_yaml_validates_against_rays_schema(path):
    from cluster.ray_private import validate_cluster_config

    validate_cluster_config(yaml.safe_load((REPO / path).read_text()))


def test_schema_rejects_a_broken_config():
    from cluster.ray_private import validate_cluster_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    raw["available_node_types"]["gpu_a10g"]["max_workers"] = "many"
    with pytest.raises(Exception):
        validate_cluster_config(raw)


def test_aws_config_has_gpu_workers():
    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert raw["provider"]["type"] == "aws" and raw["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert {"gpu_a10g", "gpu_a10g_x4"} <= set(raw["available_node_types"])


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "cluster/local.yaml"])
def test_both_launchers_copy_the_checkout_lean_and_run_ray_in_one_environment(path):
    """What `cluster/local.yaml` learned running for real (tests/test_two_hosts.py), in both files:
    the copy skips what .gitignore lists (a multi-GB .venv would go to every node), every node gets
    the client's Ray token, Ray runs where dard is installed -- on your own hosts a venv from the
    copied checkout, first on PATH at every Ray start; on AWS the image of docker/Dockerfile, so no
    node installs anything when it scales up --, the dashboard stays on the head's loopback, and a
    lost node is declared dead within seconds."""
    raw = yaml.safe_load((REPO / path).read_text())
    assert raw["rsync_filter"] == [".gitignore"] and ".venv" in (REPO / ".gitignore").read_text()
    assert raw["file_mounts"] == {"~/dard": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    (head,) = [c for c in raw["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head and "RAY_health_check_period_ms=1000" in head
    if "docker" in raw:
        assert raw["setup_commands"] == [] and (REPO / "docker" / "Dockerfile").exists()
        assert "docker/install.sh" in (REPO / "docker" / "Dockerfile").read_text()
        return
    (setup,) = [c for c in raw["setup_commands"] if "pip install" in c]
    assert "-m venv ~/dard-venv" in setup and "~/dard-venv/bin/pip install -q -e ~/dard" in setup
    for command in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert "ray start" not in command or "PATH=~/dard-venv/bin:$PATH" in command, command


def test_every_aws_node_reaches_the_bucket():
    """The nodes hold instance profiles (the head starts workers and reads the shard manifest; the
    workers stream shards and write checkpoints), and the policy they name exists."""
    import json

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    for name, node in raw["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    policy = json.loads((REPO / "cluster" / "aws" / "s3-access-policy.json").read_text())
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions


def test_the_kuberay_manifest_fits_the_rayjob_schema_and_runs_dard_train():
    """cluster/k8s/rayjob.yaml against the RayJob schema stored beside it (KubeRay's ray.io/v1
    fields it uses); the job is `dard train` from the image the cluster file builds; a typo is refused."""
    import copy
    import json

    import jsonschema

    manifest = yaml.safe_load((REPO / "cluster" / "k8s" / "rayjob.yaml").read_text())
    schema = json.loads((REPO / "cluster" / "k8s" / "rayjob.schema.json").read_text())
    jsonschema.validate(manifest, schema)
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("python -m cluster.jobs.train ") and "s3://" in spec["entrypoint"]
    images = {c["image"] for group in [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert images == {yaml.safe_load((REPO / "ray_cluster.yaml").read_text())["docker"]["image"]}
    assert spec["rayClusterSpec"]["rayVersion"] == __import__("ray").__version__
    broken = copy.deepcopy(manifest)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 4  # not replicas
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        jsonschema.validate(broken, schema)

"""cluster.yaml against the schema Ray ships, and the KubeRay manifests as YAML."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types) and config["head_node_type"] == "head"
    assert types["gpu_worker"]["max_workers"] >= 1 and types["cpu_worker"]["max_workers"] >= 1


def test_cluster_setup_installs_this_project_from_its_mount():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    commands = " && ".join(config["setup_commands"])
    assert f"cd {mount} && python3 -m pip install -e ." in commands
    assert "torch==" in commands  # pinned, never an unpinned CUDA download
    assert "--dashboard-port=8265" in " ".join(config["head_start_ray_commands"])


def test_kuberay_manifests_are_valid_yaml_with_their_kinds():
    manifests = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "platform" / "kuberay").glob("*.yaml")}
    assert manifests, "no KubeRay manifests"
    for name, doc in manifests.items():
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayService"), name
    job = manifests["rayjob-finetune.yaml"]
    assert job["spec"]["entrypoint"].startswith("python jobs/finetune.py")
    assert (ROOT / job["spec"]["entrypoint"].split()[1]).is_file()


def test_rayservice_runs_the_serve_config_application():
    from serve.app import ServeConfig

    service = yaml.safe_load((ROOT / "platform" / "kuberay" / "rayservice-clip.yaml").read_text())
    assert service["kind"] == "RayService"
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    [local] = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"]
    assert app["import_path"] == local["import_path"] == "serve.app:app_builder"
    ServeConfig(**app["args"])  # every arg is a ServeConfig field with a valid value
    ServeConfig(**local["args"])
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"dashboard", "serve"} <= {port["name"] for port in head["ports"]}

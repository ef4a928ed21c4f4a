"""The cloud launch path, checked offline: cluster.yaml and the Serve config files.

No network, no AWS, no Ray cluster. `prepare_config` only merges Ray's bundled AWS defaults.yaml
into the config (it needs neither boto3 nor credentials) and `validate_config` checks the result
against the launcher's JSON schema; neither looks inside `node_config` (instance type, AMI), which
only AWS checks, at `ray up`. The rest are targeted checks: node resources against the LLM
replica's placement-group bundles, and both Serve configs through Serve's schema and our builder.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
SERVE_CONFIGS = [ROOT / "deployments" / f"serve_config{s}.yaml" for s in ("", "_gpu", "_gpu_tp8")]
GPU_SERVE_CONFIG = SERVE_CONFIGS[1]  # deployed by the head on start
# The GPU serve configs and the GPUs per node of the worker type each is for.
GPU_CONFIGS = {4: SERVE_CONFIGS[1], 8: SERVE_CONFIGS[2]}


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(CLUSTER_YAML)


@pytest.fixture(scope="module")
def prepared(cluster) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(cluster))
    validate_config(config)
    return config


def _node_types(cluster: dict) -> tuple[dict, dict[int, dict]]:
    """(head node type, {GPUs per node: the GPU worker node type})."""
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    gpu = {t["resources"]["GPU"]: t for name, t in types.items()
           if name != cluster["head_node_type"] and t["resources"].get("GPU", 0) > 0}
    assert len(gpu) == len(types) - 1, "one GPU worker type per GPU count"
    return head, gpu


def _gpu_app_config(path: Path = GPU_SERVE_CONFIG):
    from serving.config import AppConfig

    app = _load(path)["applications"][0]
    return app, AppConfig.from_flat_args(app["args"])


def _fits(bundles: list[dict], resources: dict) -> bool:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0) + value
    return all(resources.get(key, 0) >= value for key, value in total.items())


# ---- cluster.yaml against the launcher --------------------------------------------------------------


def test_cluster_yaml_passes_the_launchers_schema(prepared):
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"] == "us-west-2"
    assert not prepared.get("docker"), "docker is not used"
    head, gpu = _node_types(prepared)
    assert prepared["max_workers"] >= sum(t["max_workers"] for t in gpu.values())
    assert all(t["max_workers"] >= 1 for t in gpu.values())
    assert head["max_workers"] == 0  # filled in by prepare_config: no extra head-type nodes


def test_our_commands_replace_rays_defaults(prepared):
    """prepare_config merges defaults per top-level key: each command list must be ours, not Ray's."""
    setup = prepared["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "pip install" in c and "torch" in c)
    project_at = next(i for i, c in enumerate(setup) if c.strip() == "pip install -q ~/ray-llm-serving")
    assert torch_at < project_at, "torch must be installed before the project"
    assert any("RAY_AUTH_MODE=token" in c for c in setup)
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    assert prepared["file_mounts"]["~/ray-llm-serving.git"] == "./.git"
    # merge_setup_commands puts setup_commands first on both kinds of node
    assert prepared["head_setup_commands"][: len(setup)] == setup
    assert prepared["worker_setup_commands"][: len(setup)] == setup
    assert any("boto3" in c for c in prepared["head_setup_commands"][len(setup):])
    head_start = prepared["head_start_ray_commands"]
    assert "ray start --head" in head_start[1] and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start[1]
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(prepared["worker_start_ray_commands"])


def test_the_project_is_installed_at_a_pinned_commit_of_this_repository(cluster):
    import re
    import subprocess

    setup = cluster["setup_commands"]
    pins = [re.search(r"PROJECT_REV=([0-9a-f]+)", c) for c in setup]
    pins = [m.group(1) for m in pins if m]
    assert len(pins) == 1 and len(pins[0]) == 40, "PROJECT_REV must be one full commit id"
    clone_at = next(i for i, c in enumerate(setup) if 'checkout -q --detach "$PROJECT_REV"' in c)
    assert "git clone" in setup[clone_at] and setup[clone_at + 1] == "pip install -q ~/ray-llm-serving"
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{pins[0]}^{{commit}}"])
    assert found.returncode == 0, f"PROJECT_REV {pins[0]} is not a commit of this repository"
    # the revision carries what the head deploys on start
    shown = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e",
                            f"{pins[0]}:deployments/serve_config_gpu.yaml"])
    assert shown.returncode == 0


def test_the_head_deploys_the_gpu_app_on_start(cluster):
    deploy = [c for c in cluster["head_start_ray_commands"] if "serve deploy" in c]
    assert len(deploy) == 1
    assert "serve deploy ~/ray-llm-serving/deployments/serve_config_gpu.yaml" in deploy[0]
    assert cluster["head_start_ray_commands"].index(deploy[0]) > 1  # after ray start
    assert "break" in deploy[0] and "sleep" in deploy[0]  # retried until the dashboard answers


def test_node_types_head_is_cpu_only_and_gpu_workers_of_4_and_8_autoscale(cluster):
    head, gpu = _node_types(cluster)
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 2
    assert head["resources"].get("serve_head", 0) >= 2
    assert sorted(gpu) == [4, 8]
    for t in gpu.values():
        assert t.get("min_workers", 0) == 0 and t["max_workers"] >= 1 and t["resources"]["CPU"] >= 8
    assert gpu[4]["node_config"]["InstanceType"] == "g5.12xlarge"
    assert gpu[8]["node_config"]["InstanceType"] == "p4d.24xlarge"


# ---- the LLM replica's placement group on a GPU node --------------------------------------------------


@pytest.mark.parametrize("tp", [4, 8])
def test_replica_bundles_fit_their_gpu_node_and_not_the_head(cluster, tp):
    from deployments.llm_server import LLMServer
    from serving.config import LLMConfig, ParallelConfig

    head, gpu = _node_types(cluster)
    llm = LLMConfig(parallel=ParallelConfig(tensor_parallel_size=tp, device="cuda"))
    opts = LLMServer.deployment_options(llm, "cuda")
    bundles = opts["placement_group_bundles"]
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert sum(b.get("GPU", 0) for b in bundles) == tp
    assert _fits(bundles, gpu[tp]["resources"])
    assert not _fits(bundles, head["resources"])  # so replicas always wait for (and trigger) a GPU node
    assert tp == 4 or not _fits(bundles, gpu[4]["resources"])  # TP=8 only on the 8-GPU type


@pytest.mark.parametrize("gpus", sorted(GPU_CONFIGS))
def test_gpu_serve_config_replicas_fit_the_cluster(cluster, gpus):
    from deployments.llm_server import LLMServer

    head, gpu = _node_types(cluster)
    _, config = _gpu_app_config(GPU_CONFIGS[gpus])
    node = gpu[gpus]
    llm = config.models[0]
    assert llm.parallel.device == "cuda" and llm.model.dtype == "bfloat16"
    assert llm.parallel.tensor_parallel_size == gpus
    opts = LLMServer.deployment_options(llm, "cuda")
    bundles = opts["placement_group_bundles"]
    assert _fits(bundles, node["resources"])
    per_node = min(int(node["resources"][k] // sum(b.get(k, 0) for b in bundles)) for k in ("CPU", "GPU"))
    assert per_node >= 1
    auto = opts["autoscaling_config"]
    assert 1 <= auto["min_replicas"] < auto["max_replicas"]
    assert auto["policy"]["policy_function"] == "deployments.autoscaling:LLMAutoscalingPolicy"
    nodes_needed = math.ceil(auto["max_replicas"] / per_node)
    assert nodes_needed <= node["max_workers"] <= cluster["max_workers"]


# ---- Serve config files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_parses_and_its_args_build(path):
    from ray.serve.schema import ServeDeploySchema

    from serving.config import AppConfig

    schema = ServeDeploySchema.model_validate(_load(path))
    for app in schema.applications:
        assert app.import_path == "deployments:app"
        AppConfig.from_flat_args(app.args)  # what `deployments.app(args)` does first


@pytest.mark.parametrize("gpus", sorted(GPU_CONFIGS))
def test_gpu_serve_config_overrides_name_real_deployments_that_fit_the_head(cluster, gpus):
    """Serve refuses an override for a deployment the app does not have; build the app graph
    (no Ray needed) with Serve's own naming and compare."""
    from ray.serve._private.build_app import build_app as serve_build_app
    from ray.serve.schema import ServeDeploySchema

    from deployments.builder import build_app

    head, _ = _node_types(cluster)
    app, config = _gpu_app_config(GPU_CONFIGS[gpus])
    built = serve_build_app(build_app(config), name=app["name"], make_deployment_handle=lambda d, a: None)
    names = {d.name for d in built.deployments}
    assert f"LLMServer:{config.models[0].model.name}" in names
    schema = ServeDeploySchema.model_validate(_load(GPU_CONFIGS[gpus]))
    overrides = schema.applications[0].deployments
    assert {o.name for o in overrides} == {"Router", "SemanticCache0"} <= names
    needs = [{"CPU": o.ray_actor_options.num_cpus, **o.ray_actor_options.resources} for o in overrides]
    assert all(set(n) >= {"CPU", "serve_head"} for n in needs)
    assert _fits(needs, head["resources"])


def test_default_app_with_tp2_fits_a_two_core_laptop():
    """Serve reserves 1 CPU per replica unless told otherwise; with that the router left too
    little for two ranks on 2 CPUs and `serve run ... tensor_parallel_size=2` waited forever."""
    from ray.serve._private.build_app import build_app as serve_build_app

    from deployments.builder import build_app
    from serving.config import AppConfig

    built = serve_build_app(build_app(AppConfig.from_flat_args({"tensor_parallel_size": 2})), name="llm",
                            make_deployment_handle=lambda d, a: None)
    cpus = 0.0
    for d in built.deployments:
        bundles = d._replica_config.placement_group_bundles  # the replica's own bundle comes first
        per_replica = sum(b.get("CPU", 0) for b in bundles) if bundles else d.ray_actor_options["num_cpus"]
        cpus += per_replica * d._deployment_config.num_replicas
    assert {d.name for d in built.deployments} == {"Router", "SemanticCache0", "LLMServer:embedded"}
    assert cpus <= 2.0, cpus

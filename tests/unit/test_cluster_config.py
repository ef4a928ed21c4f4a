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
SERVE_CONFIGS = [ROOT / "deployments" / "serve_config.yaml", ROOT / "deployments" / "serve_config_gpu.yaml"]
GPU_SERVE_CONFIG = SERVE_CONFIGS[1]


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


def _node_types(cluster: dict) -> tuple[dict, dict]:
    """(head node type, the GPU worker node type)."""
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    gpu = [t for name, t in types.items() if name != cluster["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1, "expected exactly one GPU worker node type"
    return head, gpu[0]


def _gpu_app_config():
    from serving.config import AppConfig

    app = _load(GPU_SERVE_CONFIG)["applications"][0]
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
    assert prepared["max_workers"] >= gpu["max_workers"] >= 1
    assert head["max_workers"] == 0  # filled in by prepare_config: no extra head-type nodes


def test_our_commands_replace_rays_defaults(prepared):
    """prepare_config merges defaults per top-level key: each command list must be ours, not Ray's."""
    setup = prepared["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "pip install" in c and "torch" in c)
    project_at = next(i for i, c in enumerate(setup) if "pip install" in c and "-e ~/ray-llm-serving" in c)
    assert torch_at < project_at, "torch must be installed before the project"
    assert any("RAY_AUTH_MODE=token" in c for c in setup)
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    assert "~/ray-llm-serving" in prepared["file_mounts"]
    # merge_setup_commands puts setup_commands first on both kinds of node
    assert prepared["head_setup_commands"][: len(setup)] == setup
    assert prepared["worker_setup_commands"][: len(setup)] == setup
    assert any("boto3" in c for c in prepared["head_setup_commands"][len(setup):])
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(prepared["worker_start_ray_commands"])


def test_node_types_head_is_cpu_only_and_gpu_workers_autoscale(cluster):
    head, gpu = _node_types(cluster)
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 2
    assert head["resources"].get("serve_head", 0) >= 2
    assert gpu.get("min_workers", 0) == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] == 4 and gpu["resources"]["CPU"] >= 8
    assert gpu["node_config"]["InstanceType"] == "g5.12xlarge"


# ---- the LLM replica's placement group on a GPU node --------------------------------------------------


def test_tp4_replica_bundles_fit_one_gpu_node_and_not_the_head(cluster):
    from deployments.llm_server import LLMServer
    from serving.config import LLMConfig, ParallelConfig

    head, gpu = _node_types(cluster)
    llm = LLMConfig(parallel=ParallelConfig(tensor_parallel_size=4, device="cuda"))
    opts = LLMServer.deployment_options(llm, "cuda")
    bundles = opts["placement_group_bundles"]
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert sum(b.get("GPU", 0) for b in bundles) == 4
    assert _fits(bundles, gpu["resources"])
    assert not _fits(bundles, head["resources"])  # so replicas always wait for (and trigger) a GPU node


def test_gpu_serve_config_replicas_fit_the_cluster(cluster):
    from deployments.llm_server import LLMServer

    head, gpu = _node_types(cluster)
    _, config = _gpu_app_config()
    llm = config.models[0]
    assert llm.parallel.device == "cuda" and llm.model.dtype == "bfloat16"
    assert llm.parallel.tensor_parallel_size == gpu["resources"]["GPU"]
    opts = LLMServer.deployment_options(llm, "cuda")
    bundles = opts["placement_group_bundles"]
    assert _fits(bundles, gpu["resources"])
    per_node = min(int(gpu["resources"][k] // sum(b.get(k, 0) for b in bundles))
                   for k in ("CPU", "GPU"))
    assert per_node >= 1
    auto = opts["autoscaling_config"]
    assert 1 <= auto["min_replicas"] < auto["max_replicas"]
    nodes_needed = math.ceil(auto["max_replicas"] / per_node)
    assert nodes_needed <= gpu["max_workers"] <= cluster["max_workers"]


# ---- Serve config files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_parses_and_its_args_build(path):
    from ray.serve.schema import ServeDeploySchema

    from serving.config import AppConfig

    schema = ServeDeploySchema.model_validate(_load(path))
    for app in schema.applications:
        assert app.import_path == "deployments:app"
        AppConfig.from_flat_args(app.args)  # what `deployments.app(args)` does first


def test_gpu_serve_config_overrides_name_real_deployments_that_fit_the_head(cluster):
    """Serve refuses an override for a deployment the app does not have; build the app graph
    (no Ray needed) with Serve's own naming and compare."""
    from ray.serve._private.build_app import build_app as serve_build_app
    from ray.serve.schema import ServeDeploySchema

    from deployments.builder import build_app

    head, _ = _node_types(cluster)
    app, config = _gpu_app_config()
    built = serve_build_app(build_app(config), name=app["name"], make_deployment_handle=lambda d, a: None)
    names = {d.name for d in built.deployments}
    assert "LLMServer:llama" in names
    schema = ServeDeploySchema.model_validate(_load(GPU_SERVE_CONFIG))
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

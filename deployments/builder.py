"""Builds the Serve application from the config tree: Router -> SemanticCache partitions -> one
LLMServer deployment per model.

`serve run deployments:app model=PATH tensor_parallel_size=2 ...` calls `app(args)`; a Serve config
file (deployments/serve_config.yaml) passes the same arguments under `args:`.
"""

from __future__ import annotations

from typing import Any, Optional

from ray import serve

from serving.config import AppConfig, LLMConfig


def served_model_name(config: LLMConfig) -> str:
    from serving.model_loader import served_name

    return served_name(config.model, config.model.path or "")


def build_app(config: AppConfig) -> serve.Application:
    from deployments.cache import cache_partitions
    from deployments.llm_server import LLMServer, LLMServerDeployment
    from deployments.router import Router
    from parallel.build import resolve_device
    from serving.heap import replica_env_vars
    from ray.serve.config import BackpressureConfig

    logging = {"enable_access_log": config.access_log}
    llms = {}
    for llm in config.models:
        name = served_model_name(llm)
        if name in llms:
            raise ValueError(f"two models are served as '{name}': give each a distinct model_name")
        opts = LLMServer.deployment_options(llm, resolve_device(llm))
        llms[name] = LLMServerDeployment.options(name=f"LLMServer:{name}", logging_config=logging, **opts).bind(llm)
    caches = cache_partitions(config.cache, logging) if config.cache.enabled else []
    # NOTE: past the router's own queue Serve's proxy answers 503 (plain text) with Retry-After
    overload = BackpressureConfig(status_code=503, retry_after_s=config.router.overload_retry_after_s)
    # NOTE: a redeploy replaces the router too: its streams must outlive the LLM servers' drains
    stop = config.router_shutdown
    shutdown = {"graceful_shutdown_timeout_s": stop.graceful_shutdown_timeout_s,
                "graceful_shutdown_wait_loop_s": stop.graceful_shutdown_wait_loop_s}
    return Router.options(num_replicas=config.router.num_replicas, logging_config=logging,
                          ray_actor_options={"num_cpus": config.router.num_cpus,
                                             "runtime_env": {"env_vars": replica_env_vars()}},
                          max_ongoing_requests=config.router.max_ongoing_requests,
                          max_queued_requests=config.router.max_queued_requests,
                          backpressure_config=overload, **shutdown).bind(llms, caches, config)


def app(args: Optional[dict[str, Any]] = None) -> serve.Application:
    """The app builder behind `serve run deployments:app [key=value ...]`."""
    return build_app(AppConfig.from_flat_args(args or {}))

"""Session fixtures: one small Ray cluster, one tiny model folder, one deployed app.

Every test that needs Ray uses `ray_cluster` (and `serve_port` before any `serve.run`, so Serve
listens on its free port); the app under test (router -> cache -> LLM server
with tensor_parallel_size=2) is deployed once per session by `llm_app`.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")

TINY_NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from serving.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray import serve

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def llm_app(serve_port, tiny_model):
    """The full app on the tiny model, TP=2, cache on. Yields the base URL."""
    import httpx
    from ray import serve

    from deployments import build_app
    from serving.config import AppConfig, CacheConfig, LLMConfig, ModelConfig, ParallelConfig, SchedulerConfig

    config = AppConfig(models=(LLMConfig(
        model=ModelConfig(path=tiny_model, name=TINY_NAME),
        parallel=ParallelConfig(tensor_parallel_size=2),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, block_size=8),
    # NOTE: the tests here assert hits, so a loaded 2-core machine's slow lookup must not turn one into a
    # miss: a generous deadline (the default, 50 ms, is what tests/integration/test_faults.py runs with)
    ),), cache=CacheConfig(enabled=True, timeout_s=5.0, max_timeout_s=5.0))
    serve.run(build_app(config), name="llm", route_prefix="/")
    base = f"http://127.0.0.1:{serve_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield base
    serve.delete("llm")

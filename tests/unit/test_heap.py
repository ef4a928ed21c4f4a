"""serving/heap.py: the heap trimmer thread runs once per process and gives free pages back."""

import ctypes
import threading

from serving import heap


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))


def test_one_trimmer_thread_per_process():
    assert heap.start_heap_trimmer(interval_s=60.0)
    assert heap.start_heap_trimmer(interval_s=60.0)
    assert [t.name for t in threading.enumerate()].count("heap-trim") == 1


def test_trimming_returns_freed_heap_pages():
    # Fragment the heap: many 64 KiB chunks (under glibc's mmap threshold), every other one kept.
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(64 << 10) for _ in range(4096)]  # 256 MiB
    for c in chunks:
        ctypes.memset(c, 1, 64 << 10)
    for c in chunks[::2]:
        libc.free(c)  # 128 MiB free, but between live chunks: the heap cannot shrink from its top
    before = _rss_anon_kib()
    trim = heap.heap_trimmer(interval_s=0.0)
    trim()
    after = _rss_anon_kib()
    for c in chunks[1::2]:
        libc.free(c)
    assert before - after > 64 << 10, (before, after)  # most of the 128 MiB went back (KiB)


def test_every_serving_replica_runs_with_two_malloc_arenas(monkeypatch):
    from ray.serve._private.build_app import build_app as serve_build_app

    from deployments.builder import build_app
    from serving.config import AppConfig

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    built = serve_build_app(build_app(AppConfig()), name="llm", make_deployment_handle=lambda d, a: None)
    envs = {d.name: d.ray_actor_options["runtime_env"]["env_vars"] for d in built.deployments}
    assert envs == {name: {"MALLOC_ARENA_MAX": "2"} for name in ("Router", "SemanticCache0", "LLMServer:embedded")}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the operator's own setting wins
    assert heap.replica_env_vars() == {"MALLOC_ARENA_MAX": "4"}

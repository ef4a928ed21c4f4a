"""Benchmarks: a load generator for OpenAI-compatible servers, the static-batching baseline, reports,
and the engine-overhead check.

- `python -m bench` drives our app and the baseline with one workload (docs/benchmark.md);
- `python -m bench.overhead` measures the engine's per-step time outside the model forward.
"""

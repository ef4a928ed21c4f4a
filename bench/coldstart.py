"""`python -m bench.coldstart [--size 125m|1b] [--modes ...]`: a replica's cold start, phase by
phase, and peak host memory per rank.

A random-weights Llama made from a config (`--size`: about 125M parameters, the default, or 1.1B
in TinyLlama's shape; float32 safetensors, made once under /tmp/coldstart-llama-<size>) is loaded
three ways, each in fresh processes (one per rank, gloo on CPU), one mode after the other:
- `tp1`: one process, `serving.model_loader.load_model` (what a TP=1 replica does);
- `tp2-full`: two ranks that each load the whole model, then shard it with AutoTP (the old path);
- `tp2-sharded`: two ranks that shard the meta-device model, then read only their own slices
  (`parallel.worker.load_rank`, today's path).
Per rank: seconds for the imports, the sharding (process group, AutoTP; in `tp2-sharded` also
building the meta-device model), the weights (`from_pretrained`, or reading the slices), the first
forward; RSS after the imports and peak RSS (VmHWM). Also the seconds a Ray
actor takes to answer its first call. Writes bench/results/coldstart-<size>-<time>.json.

At 1.1B (4.1 GiB of weights) `tp2-full` is left out unless asked for: its two ranks each hold the
whole model at once (about 10 GiB together), more than a 24 GiB machine shared with other work
should take.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

_COMMON = dict(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
SIZES = {
    # hidden 768, 12 layers, 12 heads (4 KV heads), MLP 2048: ~125M parameters, 477 MiB
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, **_COMMON),
    # TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads (4 KV heads), MLP 5632: 1.1B, 4.1 GiB
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, **_COMMON),
}


def model_dir(size: str) -> Path:
    return Path(f"/tmp/coldstart-llama-{size}")


def _save_model(size: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SIZES[size])).save_pretrained(model_dir(size))


def make_model(size: str) -> tuple[str, int]:
    """(the model's folder, its number of parameters); made once, in a child process, so that
    this process never holds the whole model while it measures the ranks."""
    import multiprocessing as mp

    path = model_dir(size)
    if not (path / "model.safetensors").is_file():
        p = mp.get_context("spawn").Process(target=_save_model, args=(size,))
        p.start()
        p.join()
        assert p.exitcode == 0, f"making the {size} model failed (exit code {p.exitcode})"
    from serving.model_loader import checkpoint_shapes

    return str(path), sum(math.prod(s) for s in checkpoint_shapes(str(path)).values())


def _mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


MODES = {"tp1": (1, "full"), "tp2-full": (2, "full"), "tp2-sharded": (2, "sharded")}


def _rank(rank: int, world_size: int, mode: str, path: str, port: int, queue) -> None:
    t_imports = time.monotonic()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401  (every mode pays the same imports)
    import torch
    import transformers  # noqa: F401

    from parallel import worker
    from serving.model_loader import load_model

    torch.set_num_threads(1)
    out = {"rank": rank, "imports_s": time.monotonic() - t_imports, "rss_after_imports_mib": _mib("VmRSS"),
           "shard_s": 0.0}
    t = time.monotonic()
    if mode == "sharded":
        model, times = worker.load_shard(rank, world_size, "127.0.0.1", port, path, "float32", "cpu", False, 120)
        out.update(shard_s=times["shard_s"], weights_s=times["weights_s"])
    else:
        model = load_model(path)  # from_pretrained: the whole model, built and filled
        out["weights_s"] = time.monotonic() - t
        if world_size > 1:
            t = time.monotonic()
            model = worker._shard(model, rank, world_size, "127.0.0.1", port, "float32", "cpu", False, 120)
            out["shard_s"] = time.monotonic() - t
    t = time.monotonic()
    with torch.no_grad():
        model(input_ids=torch.arange(1, 17)[None], use_cache=False)
    out["first_forward_s"] = time.monotonic() - t
    out["peak_rss_mib"] = _mib("VmHWM")
    queue.put(out)


def run_mode(mode: str, path: str) -> list[dict]:
    """Runs one mode's ranks and returns their rows; returns only once they have all exited, so
    two modes never hold memory at the same time."""
    import torch.multiprocessing as mp

    from parallel.worker import _free_port

    world_size, how = MODES[mode]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    t = time.monotonic()
    mp.spawn(_rank, args=(world_size, how, path, _free_port(), queue), nprocs=world_size, join=True)
    rows = sorted((queue.get() for _ in range(world_size)), key=lambda r: r["rank"])
    for r in rows:
        r["process_wall_s"] = time.monotonic() - t
    return rows


def ray_actor_start_s() -> float:
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self):
            return 1

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        t = time.monotonic()
        ray.get(Probe.remote().ping.remote())
        return time.monotonic() - t
    finally:
        ray.shutdown()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="125m", help="the random-weights Llama (default 125m)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                   help="the loading modes to run (default: all; at 1b, tp1 and tp2-sharded)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from bench.harness import RESULTS_DIR

    args = parse_args(argv)
    modes = args.modes or ([m for m in MODES if m != "tp2-full"] if args.size == "1b" else list(MODES))
    path, num_params = make_model(args.size)
    out = {"model": {"size": args.size, "num_params": num_params, **SIZES[args.size], "dtype": "float32"},
           "modes": {mode: run_mode(mode, path) for mode in modes},
           "ray_actor_first_call_s": ray_actor_start_s()}
    peak = {m: max(r["peak_rss_mib"] for r in rows) for m, rows in out["modes"].items()}
    above = {m: max(r["peak_rss_mib"] - r["rss_after_imports_mib"] for r in rows) for m, rows in out["modes"].items()}
    out["ratios"] = {}
    if "tp1" in peak:
        for m in (m for m in peak if m != "tp1"):
            name = m.replace("-", "_")
            out["ratios"][f"peak_rss_{name}_over_tp1"] = round(peak[m] / peak["tp1"], 2)
            out["ratios"][f"peak_above_imports_{name}_over_tp1"] = round(above[m] / above["tp1"], 2)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    dest = RESULTS_DIR / f"coldstart-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.write_text(json.dumps(out, indent=2))
    print(f"model: {num_params / 1e6:.0f}M parameters, float32")
    for mode, rows in out["modes"].items():
        for r in rows:
            print(f"{mode:12s} rank {r['rank']}: imports {r['imports_s']:.1f} s, shard {r['shard_s']:.1f} s, "
                  f"weights {r['weights_s']:.1f} s, first forward {r['first_forward_s']:.2f} s; RSS after imports "
                  f"{r['rss_after_imports_mib']:.0f} MiB, peak {r['peak_rss_mib']:.0f} MiB")
    print(f"Ray actor, first call answered after {out['ray_actor_first_call_s']:.1f} s")
    print(f"ratios: {out['ratios']}\nwrote {dest}")
    return out


if __name__ == "__main__":
    main()

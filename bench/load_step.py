"""`python -m bench.load_step`: the LLM autoscaling policy against Serve's default on one load step.

Each policy gets the same run of bench/fake_cluster.py (a fresh fake multi-node cluster, the tiny
model, 12 streaming clients from t=0 for `--load-s` seconds, then idle), one after the other in
processes of their own. Reported per policy: when Serve first asked for a second replica, when it
served, TTFT p50/p99 under the step, requests ok and failed, peak replicas and nodes; and the
ratios ours / default. Writes bench/results/load-step-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.fake_cluster import new_temp_dir, stop_leftovers
from bench.harness import RESULTS_DIR

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("llm", "ongoing_requests")


def run_policy(policy: str, model: str, load_s: float, budget_s: float) -> dict:
    temp_dir = new_temp_dir()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.fake_cluster", "--model", model, "--temp-dir", temp_dir,
                               "--policy", policy, "--load-s", str(load_s), "--budget-s", str(budget_s)],
                              cwd=ROOT, capture_output=True, text=True, timeout=budget_s + 120)
    finally:
        stop_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{policy}: no result\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.load_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-s", type=float, default=60.0, help="seconds of load after the step")
    p.add_argument("--budget-s", type=float, default=240.0, help="per policy, cluster start included")
    args = p.parse_args(argv)
    from serving.models.tiny import make_tiny_model

    model = make_tiny_model(Path("/tmp") / "tiny-load-step")
    results = {policy: run_policy(policy, model, args.load_s, args.budget_s) for policy in POLICIES}
    ours, default = results["llm"], results["ongoing_requests"]
    ratios = {k: round(ours[k] / default[k], 2) for k in ("first_scale_up_s", "second_replica_serving_s",
                                                          "ttft_p50_s", "ttft_p99_s")
              if ours.get(k) and default.get(k)}
    out = {"load_s": args.load_s, "results": results, "ratio_llm_over_default": ratios}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"load-step-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    for policy, r in results.items():
        print(f"{policy:17s} first scale-up {r['first_scale_up_s']} s, second replica serving "
              f"{r['second_replica_serving_s']} s, TTFT p50 {r['ttft_p50_s']:.3f} s p99 {r['ttft_p99_s']:.3f} s, "
              f"ok {r['ok']} failed {r['num_failed']}, peak {r['peak_running']} replicas {r['peak_nodes']} nodes")
    print(f"llm / default: {ratios}\nwrote {path}")
    return out


if __name__ == "__main__":
    main()

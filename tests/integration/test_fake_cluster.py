"""A simulated multi-node cluster (bench/fake_cluster.py, in its own process: one Ray
driver per process, and the session's cluster may already be up): load rises, the LLM policy
adds replicas, the Ray autoscaler launches fake nodes for their placement groups, no request fails;
load stops, replicas and nodes go away. About 2.5 minutes on 2 cores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_replicas_and_fake_nodes_follow_the_load(tiny_model, capsys):
    from bench.fake_cluster import new_temp_dir, stop_leftovers

    temp_dir = new_temp_dir()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.fake_cluster", "--model", tiny_model,
                               "--temp-dir", temp_dir, "--budget-s", "240"],
                              cwd=ROOT, capture_output=True, text=True, timeout=420)
    finally:
        stop_leftovers(temp_dir)  # the script stops its cluster; this covers a time-out
        shutil.rmtree(temp_dir, ignore_errors=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    with capsys.disabled():  # the replica and node counts over time
        print("\n" + "\n".join(rows + result_lines[-1:]))
    assert proc.returncode == 0 and result_lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_lines[-1][len("RESULT "):])
    assert result["ok"] > 100 and result["num_failed"] == 0, result["failed"]
    assert result["peak_running"] == 3 and result["peak_nodes"] == 4  # head + one node per replica
    assert result["final_running"] == 1 and result["final_replicas"] == 1 and result["final_nodes"] == 2

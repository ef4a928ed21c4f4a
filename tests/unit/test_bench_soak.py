"""The soak benchmark's pure parts: RSS growth from minute 1, tokens per minute, the verdict, prompts."""

import itertools

import pytest

from bench.client import RequestResult
from bench.soak import REPEAT_WINDOW, growth, per_minute, prompts, verdict

MIB = 2**20


def test_growth_compares_the_median_of_minute_2_with_the_median_of_the_last_minute():
    samples = [(0.0, {1: ("Router", 50 * MIB), 2: ("EngineProcess", 300 * MIB)}),
               (58.0, {1: ("Router", 90 * MIB), 2: ("EngineProcess", 400 * MIB)})]  # still starting up
    router = [100, 101, 140, 100, 102, 101, 103, 104, 103, 150, 105, 104]  # two transient peaks
    for i, rss in enumerate(router):  # minute 2: 61-111 s; the last minute: 121-171 s
        procs = {1: ("Router", rss * MIB), 3: ("ServeReplica:new", MIB)}
        if i < 6:
            procs[2] = ("EngineProcess", 400 * MIB)
        if i == len(router) - 1:
            procs[4] = ("ServeReplica:late", MIB)
        samples.append((61.0 + 10 * i, procs))
    rows = {r["pid"]: r for r in growth(samples)}
    assert (rows[1]["start_bytes"], rows[1]["end_bytes"]) == (101 * MIB, 104 * MIB)
    assert rows[1]["growth_pct"] == pytest.approx(100 * 3 / 101)
    assert rows[1]["point_growth_pct"] == pytest.approx(4.0)  # 100 -> 104, the two single samples
    assert rows[2]["end_bytes"] is None and rows[2]["growth_pct"] is None  # went away
    assert rows[3]["growth_pct"] == 0.0
    assert rows[4]["start_bytes"] is None and rows[4]["label"] == "ServeReplica:late"  # appeared


def test_verdict_fails_on_errors_growth_at_the_limit_and_replaced_processes():
    ok = {"label": "Router", "pid": 1, "start_bytes": 100, "end_bytes": 104, "growth_pct": 4.99}
    assert verdict([ok], 0, 5.0) == []
    at_limit = {**ok, "end_bytes": 105, "growth_pct": 5.0}
    gone = {**ok, "pid": 2, "end_bytes": None, "growth_pct": None}
    reasons = verdict([ok, at_limit, gone], 3, 5.0)
    assert reasons[0] == "3 requests failed"
    assert "grew 5.0%" in reasons[1] and "went away" in reasons[2] and len(reasons) == 3


def result(sent_s: float, e2e_s, ok: bool, tokens: int) -> RequestResult:
    return RequestResult(0, None, sent_s=sent_s, ok=ok, e2e_s=e2e_s, output_tokens=tokens)


def test_per_minute_counts_where_requests_end_and_divides_by_each_minute_s_length():
    results = [result(10, 5, True, 60), result(50, 20, True, 120), result(100, None, False, 0),
               result(119, 11, True, 30)]  # sent before the end of the soak, ended in the run's tail
    rows = per_minute(results, 130.0)
    assert [(r["requests"], r["errors"]) for r in rows] == [(1, 0), (3, 1)]
    assert rows[0]["tokens_per_s"] == pytest.approx(1.0) and rows[1]["tokens_per_s"] == pytest.approx(150 / 70)
    assert len(per_minute([], 30.0)) == 1 and per_minute([], 30.0)[0]["tokens_per_s"] == 0.0


def test_prompts_are_fresh_except_the_repeats_which_were_sent_before():
    reqs = list(itertools.islice(prompts(0, 12, 8, 0.25), 1000))
    fresh, repeats = [], 0
    for r in reqs:
        if r.prompt in fresh:
            repeats += 1
            assert r.prompt in fresh[-REPEAT_WINDOW:]  # recent enough for a full cache to hold
        else:
            fresh.append(r.prompt)
    assert 0.2 < repeats / len(reqs) < 0.3 and all(r.max_tokens == 8 for r in reqs)
    assert [r.prompt for r in itertools.islice(prompts(0, 12, 8, 0.0), 50)] == \
        [r.prompt for r in itertools.islice(prompts(0, 12, 8, 0.0), 50)]  # seeded


def test_resident_memory_of_a_process_tree():
    import os
    import subprocess
    import sys

    from bench import cpu

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = cpu.resident(os.getpid())
        assert child.pid in mine and os.getpid() not in mine and mine[child.pid][1] > 2**20
        assert cpu.resident()[os.getpid()][0] == "benchmark client"
    finally:
        child.kill()
        child.wait()

"""The JSONL trace format (bench/workload.py); pure Python, no Ray."""

import json
from pathlib import Path

import pytest

from bench import workload as wl

EXAMPLE = Path(__file__).resolve().parents[2] / "bench" / "traces" / "example.jsonl"


def test_parse_sorts_and_skips_comments():
    lines = [
        '# a comment',
        '{"arrival_s": 2.5, "prompt": "b", "max_tokens": 4}',
        '',
        '{"arrival_s": 0.5, "prompt": "a", "max_tokens": 8, "extra": "ignored"}',
        '{"prompt": "c", "max_tokens": 1}',
    ]
    reqs = wl.parse_trace(lines)
    assert [r.prompt for r in reqs] == ["c", "a", "b"]
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 2.5]
    assert reqs[1].max_tokens == 8


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ("[1, 2]", "expected an object"),
    ('{"prompt": "", "max_tokens": 3}', "'prompt'"),
    ('{"prompt": "x", "max_tokens": 0}', "'max_tokens'"),
    ('{"prompt": "x", "max_tokens": true}', "'max_tokens'"),
    ('{"prompt": "x", "max_tokens": 3, "arrival_s": -1}', "'arrival_s'"),
])
def test_parse_rejects_bad_lines_with_location(line, message):
    with pytest.raises(ValueError, match=message) as e:
        wl.parse_trace(['{"prompt": "ok", "max_tokens": 1}', line], source="t.jsonl")
    assert "t.jsonl:2" in str(e.value)


def test_empty_trace_is_an_error():
    with pytest.raises(ValueError, match="no requests"):
        wl.parse_trace(["", "# nothing"])


def test_save_and_load_round_trip(tmp_path):
    reqs = wl.with_arrivals(wl.synthetic_workload(6, seed=2), wl.poisson_arrivals(6, 2.0, seed=2))
    path = tmp_path / "t.jsonl"
    wl.save_trace(path, reqs)
    back = wl.load_trace(path)
    assert [(r.prompt, r.max_tokens) for r in back] == [(r.prompt, r.max_tokens) for r in reqs]
    assert [r.arrival_s for r in back] == pytest.approx([r.arrival_s for r in reqs], abs=1e-6)
    assert all(set(json.loads(line)) == {"arrival_s", "prompt", "max_tokens"} for line in path.read_text().splitlines())


def test_shipped_example_trace_parses():
    reqs = wl.load_trace(EXAMPLE)
    assert len(reqs) >= 10
    assert wl.mean_rate(reqs) is not None

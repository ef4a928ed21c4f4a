"""Benchmark workloads: what to send and when.

A workload is a list of `BenchRequest`s (prompt, max_tokens, arrival offset). It comes from a
fixed-seed synthetic distribution (`synthetic_workload`) or from a JSONL trace (`load_trace`), one
JSON object per line:

    {"arrival_s": 0.0, "prompt": "Tell me about rivers", "max_tokens": 64}

`arrival_s` is the offset in seconds from the start of the run (optional: missing means 0, which
replays as a burst). Arrival times for an open-loop run at a given rate are Poisson
(`poisson_arrivals`, seeded), or the trace's own offsets scaled to that rate (`scale_arrivals`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

# Common English words; prompts are made of these so any tokenizer sees ordinary text.
WORDS = (
    "the of and to in is was for that with as on by at from his her they this which be are "
    "or had not but have were one all their there been has when who will more no if out so "
    "said what up its about into than them can only other new some time could these two may "
    "then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three river mountain city garden "
    "window letter morning evening summer winter market bridge forest music table story water "
    "light stone field road house child mother father friend question answer number system"
).split()

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload.

    `prompt_len` is the intended prompt length in tokens (exact when a tokenizer was given to the
    generator, an estimate otherwise, None for a trace). `arrival_s` is the offset from the run's start.
    """

    prompt: str
    max_tokens: int
    arrival_s: float = 0.0
    prompt_len: Optional[int] = None


@dataclass(frozen=True)
class LengthDist:
    """Prompt and output length distribution of the synthetic workload.

    Prompt lengths are lognormal (median `prompt_median`, log-space sigma `prompt_sigma`) clipped to
    [`prompt_min`, `prompt_max`]. max_tokens is uniform over [`output_min`, `output_max`], or with
    `output_sigma` > 0 lognormal (median `output_median`, sigma `output_sigma`) clipped to that
    range: the heavy tail of chat answers (ShareGPT-like), where static batching waits longest.
    """

    prompt_median: int = 128
    prompt_sigma: float = 0.6
    prompt_min: int = 16
    prompt_max: int = 512
    output_min: int = 16
    output_max: int = 128
    output_median: int = 48
    output_sigma: float = 0.0  # 0: uniform max_tokens

    def __post_init__(self):
        if not 1 <= self.prompt_min <= self.prompt_median <= self.prompt_max:
            raise ValueError("need 1 <= prompt_min <= prompt_median <= prompt_max")
        if not 1 <= self.output_min <= self.output_max:
            raise ValueError("need 1 <= output_min <= output_max")
        if self.prompt_sigma < 0 or self.output_sigma < 0:
            raise ValueError("prompt_sigma and output_sigma must be >= 0")
        if self.output_sigma > 0 and not self.output_min <= self.output_median <= self.output_max:
            raise ValueError("need output_min <= output_median <= output_max")

    def fit_context(self, max_model_len: int) -> "LengthDist":
        """Shrink the ranges so that the longest prompt plus the longest output fits the context."""
        if self.prompt_max + self.output_max <= max_model_len:
            return self
        output_max = min(self.output_max, max(1, max_model_len // 4))
        prompt_max = max(1, max_model_len - output_max)
        return LengthDist(
            prompt_median=min(self.prompt_median, prompt_max),
            prompt_sigma=self.prompt_sigma,
            prompt_min=min(self.prompt_min, prompt_max),
            prompt_max=prompt_max,
            output_min=min(self.output_min, output_max),
            output_max=output_max,
            output_median=min(self.output_median, output_max),
            output_sigma=self.output_sigma,
        )


def estimate_tokens(text: str) -> int:
    """Token count of `text` without a tokenizer: about 1.3 tokens per word (BPE on English)."""
    return max(1, round(1.3 * len(text.split())))


def make_prompt(rng: random.Random, num_tokens: int, count_tokens: Optional[TokenCounter] = None) -> str:
    """A prompt of random words whose token count is about `num_tokens`.

    The result has at most `num_tokens` tokens and is within one word of it, as counted by
    `count_tokens` (e.g. the served model's tokenizer) or, without one, by `estimate_tokens`.
    """
    count = count_tokens or estimate_tokens
    # First guess from the per-word ratio of a sample, then add or drop words until it fits.
    sample = " ".join(rng.choice(WORDS) for _ in range(64))
    per_word = max(count(sample) / 64.0, 1e-3)
    words = [rng.choice(WORDS) for _ in range(max(1, round(num_tokens / per_word)))]
    n = count(" ".join(words))
    while n < num_tokens:
        words.extend(rng.choice(WORDS) for _ in range(max(1, int((num_tokens - n) / per_word))))
        n = count(" ".join(words))
    while n > num_tokens and len(words) > 1:
        words.pop()
        n = count(" ".join(words))
    return " ".join(words)


def synthetic_workload(
    num_requests: int,
    seed: int = 0,
    dist: LengthDist = LengthDist(),
    count_tokens: Optional[TokenCounter] = None,
) -> list[BenchRequest]:
    """`num_requests` requests with lengths drawn from `dist` by a `random.Random(seed)`.

    The same arguments always give the same prompts and max_tokens; arrival offsets are 0 (set them
    with `poisson_arrivals` or `with_arrivals`).
    """
    if num_requests < 1:
        raise ValueError("num_requests must be >= 1")
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        prompt_len = _clipped_lognormal(rng, dist.prompt_median, dist.prompt_sigma, dist.prompt_min, dist.prompt_max)
        if dist.output_sigma > 0:
            max_tokens = _clipped_lognormal(rng, dist.output_median, dist.output_sigma, dist.output_min,
                                            dist.output_max)
        else:
            max_tokens = rng.randint(dist.output_min, dist.output_max)
        out.append(BenchRequest(make_prompt(rng, prompt_len, count_tokens), max_tokens, 0.0, prompt_len))
    return out


def _clipped_lognormal(rng: random.Random, median: int, sigma: float, lo: int, hi: int) -> int:
    return int(min(max(round(rng.lognormvariate(math.log(median), sigma)), lo), hi))


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival offsets (seconds, first at 0) of a Poisson process with `rate` requests per second."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(f"arrivals-{seed}-{rate}")
    t, out = 0.0, []
    for i in range(num_requests):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


def scale_arrivals(offsets: Sequence[float], rate: float) -> list[float]:
    """Stretch or squeeze recorded offsets so that their mean rate is `rate`, keeping their shape."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    base = [t - offsets[0] for t in offsets] if offsets else []
    span = base[-1] if base else 0.0
    if len(base) < 2 or span <= 0:
        return [i / rate for i in range(len(base))]
    factor = (len(base) - 1) / rate / span
    return [t * factor for t in base]


def with_arrivals(requests: Sequence[BenchRequest], offsets: Sequence[float]) -> list[BenchRequest]:
    """The same requests with new arrival offsets."""
    if len(offsets) != len(requests):
        raise ValueError("need one offset per request")
    return [replace(r, arrival_s=float(t)) for r, t in zip(requests, offsets)]


def mean_rate(requests: Sequence[BenchRequest]) -> Optional[float]:
    """Requests per second implied by the arrival offsets; None when they are all at one instant."""
    if len(requests) < 2:
        return None
    span = max(r.arrival_s for r in requests) - min(r.arrival_s for r in requests)
    return (len(requests) - 1) / span if span > 0 else None


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> list[BenchRequest]:
    """Parse JSONL trace lines (blank lines and lines starting with '#' are skipped), sorted by arrival."""
    out = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{lineno}: not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{source}:{lineno}: expected an object")
        prompt, max_tokens = obj.get("prompt"), obj.get("max_tokens")
        arrival = obj.get("arrival_s", 0.0)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{source}:{lineno}: 'prompt' must be a non-empty string")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"{source}:{lineno}: 'max_tokens' must be a positive integer")
        if not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or arrival < 0:
            raise ValueError(f"{source}:{lineno}: 'arrival_s' must be a number >= 0")
        out.append(BenchRequest(prompt, max_tokens, float(arrival)))
    if not out:
        raise ValueError(f"{source}: no requests")
    return sorted(out, key=lambda r: r.arrival_s)


def load_trace(path: str | Path) -> list[BenchRequest]:
    """Read a JSONL trace file (see the module docstring for the format)."""
    with open(path, encoding="utf-8") as f:
        return parse_trace(f, str(path))


def save_trace(path: str | Path, requests: Iterable[BenchRequest]) -> None:
    """Write requests as a JSONL trace that `load_trace` reads back."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps({"arrival_s": round(r.arrival_s, 6), "prompt": r.prompt, "max_tokens": r.max_tokens}) + "\n")


def describe(requests: Sequence[BenchRequest]) -> dict:
    """Summary of a workload's shape for the report."""
    outs = [r.max_tokens for r in requests]
    lens = [r.prompt_len for r in requests if r.prompt_len is not None]
    d = {"num_requests": len(requests), "max_tokens_mean": sum(outs) / len(outs),
         "max_tokens_min": min(outs), "max_tokens_max": max(outs)}
    if lens:
        d.update(prompt_len_mean=sum(lens) / len(lens), prompt_len_min=min(lens), prompt_len_max=max(lens))
    return d


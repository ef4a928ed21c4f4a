"""Issue 4's bar: 1000 requests queued at once against a small block budget all complete, and
memory stays bounded (KV blocks within the budget at every step, engine state empty at the end)."""

from __future__ import annotations

import asyncio
import resource

import pytest

from serving.config import LLMConfig, ModelConfig, SchedulerConfig
from serving.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from serving.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def test_thousand_requests_against_small_block_budget(tiny):
    from serving.async_engine import AsyncEngine
    from parallel.build import build_engine

    num_blocks = 64  # 512 token slots for 1000 requests needing ~15000
    engine = build_engine(LLMConfig(
        model=ModelConfig(path=tiny),
        scheduler=SchedulerConfig(block_size=8, num_kv_blocks=num_blocks, max_num_seqs=32,
                                  max_num_batched_tokens=256, max_waiting_requests=1000)))
    peak_blocks = []
    aengine = AsyncEngine(engine, max_waiting_requests=1000,
                          on_step=lambda stats, eng: peak_blocks.append(stats.num_kv_blocks_used))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async def one(i):
        prompt = [(i * 13 + j) % 400 + 20 for j in range(4 + i % 16)]
        n = 0
        async for out in aengine.generate(f"q{i}", prompt, SamplingParams(max_tokens=3, temperature=0.0)):
            n += len(out.token_ids)
            reason = out.finish_reason
        return n, reason

    async def main():
        return await asyncio.gather(*(one(i) for i in range(1000)))

    results = asyncio.run(main())
    aengine.shutdown()
    assert len(results) == 1000
    assert all(n == 3 and reason == "length" for n, reason in results)
    assert max(peak_blocks) <= num_blocks
    assert engine.blocks.num_free_blocks == num_blocks
    assert not engine.has_unfinished() and not engine._seqs and not engine._detok
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 300, f"peak RSS grew by {grown_mib:.0f} MiB"

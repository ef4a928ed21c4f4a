"""AsyncEngine over a local engine on the tiny model: concurrent streams, cancellation, overload,
and a failing worker group. pytest-asyncio is not used: each test runs its own event loop."""

import asyncio
import threading
import time

import pytest

from serving.async_engine import AsyncEngine
from serving.config import LLMConfig, ModelConfig, SchedulerConfig
from serving.engine import LLMEngine
from serving.errors import ContextLengthError, InvalidRequestError, OverloadedError, UnavailableError
from parallel.build import build_engine
from serving.executor import LocalExecutor
from serving.model_loader import load_model_info, load_tokenizer
from serving.sampling import SamplingParams

NUM_BLOCKS = 300


def config(model_path: str, max_num_seqs: int = 4) -> LLMConfig:
    return LLMConfig(model=ModelConfig(path=model_path),
                     scheduler=SchedulerConfig(block_size=4, num_kv_blocks=NUM_BLOCKS, max_num_seqs=max_num_seqs,
                                               max_num_batched_tokens=32))


@pytest.fixture(scope="module")
def engine(tiny_model):
    return build_engine(config(tiny_model))


@pytest.fixture(autouse=True)
def idle_after(engine):
    yield
    for request_id in list(engine._seqs):  # a failed test must not fail the next ones
        engine.abort(request_id)


def is_idle(engine) -> bool:
    return not engine.has_unfinished() and engine.blocks.num_free_blocks == engine.blocks.num_blocks


async def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def collect(agen) -> list:
    return [out async for out in agen]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


PROMPTS = [[7 + (11 * i + j) % 400 for j in range(3 + 5 * i)] for i in range(8)]


def test_concurrent_streams_finish_with_the_right_tokens(engine):
    max_tokens = [3 + i for i in range(8)]
    # the same requests through the synchronous engine, for the expected greedy tokens
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"sync{i}", prompt, greedy(max_tokens[i]))
    expected = {f"sync{i}": [] for i in range(8)}
    while engine.has_unfinished():
        for out in engine.step()[0]:
            expected[out.request_id] += out.token_ids
    steps = []

    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=64, on_step=lambda stats, finished: steps.append(stats))
        try:
            return await asyncio.gather(*(collect(ae.generate(f"a{i}", p, greedy(max_tokens[i])))
                                          for i, p in enumerate(PROMPTS)))
        finally:
            ae.shutdown()

    streams = asyncio.run(main())
    for i, outs in enumerate(streams):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        last = outs[-1]
        assert last.finish_reason == "length" and last.num_output_tokens == max_tokens[i]
        assert last.num_prompt_tokens == len(PROMPTS[i])
        assert [t for o in outs for t in o.token_ids] == expected[f"sync{i}"]
        assert {o.request_id for o in outs} == {f"a{i}"}
    assert steps and max(s.num_seqs for s in steps) <= 4
    assert is_idle(engine)


def test_middle_items_carry_their_text(engine):
    """The engine decodes a request without stop strings only when an output is published: the
    middle items still carry their text, and the streamed text is the full decode of the tokens."""
    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=64)
        try:
            return await collect(ae.generate("texts", PROMPTS[3], greedy(24)))
        finally:
            ae.shutdown()

    outs = asyncio.run(main())
    ids = [t for o in outs for t in o.token_ids]
    assert len(ids) == 24 and len(outs) > 2
    assert "".join(o.text for o in outs) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert sum(bool(o.text) for o in outs[1:-1]) >= len(outs[1:-1]) // 2  # not all left to the last item


def test_stream_interval_grows_with_the_number_of_streams(engine):
    ae = AsyncEngine(engine, max_waiting_requests=64, stream_interval_s=0.05, max_stream_items_per_s=300)
    ae._streams = {f"r{i}": None for i in range(4)}
    assert ae._stream_interval() == 0.05  # light load: the configured minimum
    ae._streams = {f"r{i}": None for i in range(64)}
    assert ae._stream_interval() == pytest.approx(64 / 300)
    assert AsyncEngine(engine, 64, stream_interval_s=0.05)._stream_interval() == 0.05  # no bound


def test_the_first_and_last_items_never_wait_for_the_interval(engine):
    """A 1 s interval between items: the first goes out at once, and the finish cuts the wait
    short, so a 3-token request takes far less than the interval, in at most two items."""
    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=64, stream_interval_s=1.0)
        try:
            t0 = time.monotonic()
            outs, first_at = [], None
            async for out in ae.generate("quick", PROMPTS[0], greedy(3)):
                first_at = first_at or time.monotonic() - t0
                outs.append(out)
            return outs, first_at, time.monotonic() - t0
        finally:
            ae.shutdown()

    outs, first_at, elapsed = asyncio.run(main())
    assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == 3
    assert len(outs) <= 2
    assert first_at < 0.5 and elapsed < 0.5


def test_a_stream_items_budget_merges_tokens_into_fewer_items(engine):
    """8 streams under a budget of 8 items/s: after its first item each stream waits ~1 s, by when
    the tiny model has produced all its tokens, which then go out merged as one item."""
    async def main(budget):
        ae = AsyncEngine(engine, max_waiting_requests=64, max_stream_items_per_s=budget)
        try:
            return await asyncio.gather(*(collect(ae.generate(f"b{budget}-{i}", p, greedy(20)))
                                          for i, p in enumerate(PROMPTS)))
        finally:
            ae.shutdown()

    unbounded, bounded = asyncio.run(main(0)), asyncio.run(main(8))
    for free, merged in zip(unbounded, bounded):
        assert [t for o in merged for t in o.token_ids] == [t for o in free for t in o.token_ids]
        assert len(merged) <= 3
        assert merged[-1].finished and merged[-1].num_output_tokens == 20
    assert sum(map(len, unbounded)) > sum(map(len, bounded))
    assert is_idle(engine)


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_a_consumer_that_goes_away_aborts_its_request(engine, how):
    finished = []

    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=64, on_step=lambda stats, done: finished.extend(done))
        try:
            agen = ae.generate(f"gone-{how}", PROMPTS[5], greedy(900))
            if how == "aclose":
                first = await agen.__anext__()
                assert not first.finished
                assert engine.blocks.num_used_blocks > 0
                await agen.aclose()
            else:
                got_one = asyncio.Event()

                async def consume():
                    async for _ in agen:
                        got_one.set()

                task = asyncio.create_task(consume())
                await got_one.wait()
                assert engine.blocks.num_used_blocks > 0
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            await wait_for(lambda: is_idle(engine))
        finally:
            ae.shutdown()

    asyncio.run(main())
    stats = finished[-1]
    assert stats.request_id == f"gone-{how}" and stats.finish_reason == "abort"
    assert stats.num_output_tokens < 900


def test_too_many_waiting_requests_are_refused(tiny_model):
    engine = build_engine(config(tiny_model, max_num_seqs=1))

    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=2)
        try:
            running = ae.generate("long", [7, 8, 9, 10], greedy(1000))
            await running.__anext__()  # the only sequence slot is taken for ~1000 steps
            waiting = [asyncio.create_task(collect(ae.generate(f"w{i}", [7, 8], greedy(2)))) for i in range(2)]
            await wait_for(lambda: engine.num_waiting == 2)
            with pytest.raises(OverloadedError) as info:
                await ae.generate("one-too-many", [7, 8], greedy(2)).__anext__()
            assert info.value.status_code == 429 and info.value.retry_after > 0
            await running.aclose()  # room again: the waiting ones run to the end
            outs = await asyncio.gather(*waiting)
            assert all(o[-1].finished and o[-1].num_output_tokens == 2 for o in outs)
            await wait_for(lambda: is_idle(engine))
        finally:
            ae.shutdown()

    asyncio.run(main())


def test_request_errors_come_before_the_stream(engine):
    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=64)
        try:
            with pytest.raises(ContextLengthError):
                await ae.generate("too-long", [7] * 1000, greedy(100)).__anext__()
        finally:
            ae.shutdown()

    asyncio.run(main())
    assert is_idle(engine)


def test_a_duplicate_request_id_leaves_the_first_request_alone(engine):
    finished = []

    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=64, on_step=lambda stats, done: finished.extend(done))
        first = ae.generate("same", PROMPTS[1], greedy(10))
        try:
            head = await first.__anext__()
            with pytest.raises(InvalidRequestError, match="duplicate"):
                await collect(ae.generate("same", PROMPTS[2], greedy(3)))
            await wait_for(lambda: len(finished) > 0)
            assert finished[0].finish_reason == "length"
            # NOTE: the first item may already hold all 10 tokens, merged, when the engine ran ahead
            rest = [] if head.finished else await asyncio.wait_for(collect(first), 10)
            outs = [head, *rest]
            assert outs[-1].num_output_tokens == 10 and sum(len(o.token_ids) for o in outs) == 10
        finally:
            await first.aclose()
            ae.shutdown()

    asyncio.run(main())


class DeadRankExecutor(LocalExecutor):
    """Stand-in for a worker group that loses a rank: steps work, then every step raises."""

    def __init__(self, *args, good_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_left = good_steps

    def execute(self, inp):
        if self.steps_left == 0:
            raise RuntimeError("rank 1 died")
        self.steps_left -= 1
        return super().execute(inp)


def test_a_failing_executor_fails_requests_in_flight(tiny_model):
    cfg = config(tiny_model)
    info = load_model_info(cfg.model)
    executor = DeadRankExecutor(info.path, "float32", NUM_BLOCKS, 4, good_steps=3)
    engine = LLMEngine(cfg, info, load_tokenizer(info.path), executor, NUM_BLOCKS)

    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=64)
        try:
            async def consume(i):
                outs = []
                with pytest.raises(UnavailableError, match="rank 1 died"):
                    async for out in ae.generate(f"f{i}", PROMPTS[i], greedy(50)):
                        outs.append(out)
                return outs

            outs = await asyncio.gather(*(consume(i) for i in range(3)))
            assert sum(len(o) for o in outs) > 0, "some tokens before the failure"
            assert not any(o.finished for stream in outs for o in stream)
            assert isinstance(ae.error, RuntimeError)
            with pytest.raises(UnavailableError):  # new requests are refused while unhealthy
                await ae.generate("after", PROMPTS[0], greedy(5)).__anext__()
        finally:
            ae.shutdown()

    asyncio.run(main())


class HangingExecutor(LocalExecutor):
    """Stand-in for a worker group whose step never returns (a rank died inside a collective)."""

    def __init__(self, *args, good_steps: int, ranks_answer: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_left = good_steps
        self.ranks_answer = ranks_answer
        self.release = threading.Event()

    def execute(self, inp):
        if self.steps_left == 0:
            self.release.wait(30)
            raise RuntimeError("released")
        self.steps_left -= 1
        return super().execute(inp)

    def check_health(self):
        if not self.ranks_answer:
            raise RuntimeError("rank 1 is dead")


@pytest.mark.parametrize("ranks_answer,step_timeout_s,within_s", [(False, 60.0, 5.0), (True, 1.0, 4.0)])
def test_the_watchdog_ends_requests_of_a_hung_step(tiny_model, ranks_answer, step_timeout_s, within_s):
    """A dead rank (the ping fails once a step runs long) or a step past its timeout ends every
    request in flight with 503 within a bounded time, and new requests are refused."""
    cfg = config(tiny_model)
    info = load_model_info(cfg.model)
    executor = HangingExecutor(info.path, "float32", NUM_BLOCKS, 4, good_steps=3, ranks_answer=ranks_answer)
    engine = LLMEngine(cfg, info, load_tokenizer(info.path), executor, NUM_BLOCKS)

    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=64, step_timeout_s=step_timeout_s)
        try:
            t0 = time.monotonic()
            with pytest.raises(UnavailableError):
                await asyncio.wait_for(collect(ae.generate("hung", PROMPTS[0], greedy(50))), 20)
            elapsed = time.monotonic() - t0
            with pytest.raises(UnavailableError):
                await ae.generate("after", PROMPTS[0], greedy(5)).__anext__()
            return elapsed
        finally:
            executor.release.set()
            ae.shutdown()

    assert asyncio.run(main()) < within_s


def test_drain_lets_short_requests_finish_then_ends_the_rest_and_refuses_new_ones(engine):
    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=64)
        try:
            short = asyncio.create_task(collect(ae.generate("short", PROMPTS[1], greedy(5))))
            long = ae.generate("long", PROMPTS[2], greedy(1000))
            head = await long.__anext__()
            started = time.monotonic()
            ended = await ae.drain(0.2, UnavailableError("shutting down", code="shutting_down"))
            assert ended == 1 and 0.2 <= time.monotonic() - started < 2
            assert (await short)[-1].finish_reason == "length"
            tokens = len(head.token_ids)
            with pytest.raises(UnavailableError, match="shutting down"):
                async for out in long:  # what it already had comes first, then the error
                    tokens += len(out.token_ids)
            assert 0 < tokens < 1000
            with pytest.raises(UnavailableError, match="shutting down"):
                await ae.generate("late", PROMPTS[3], greedy(5)).__anext__()
            await wait_for(lambda: is_idle(engine))
        finally:
            ae.shutdown()

    asyncio.run(main())

"""The engine core behind a socket (serving/engine_core.py): an AsyncEngine over an EngineCoreClient,
with the CoreServer on the other end of a local connection (a thread here; a process of its own in
the Serve replica, tests/integration). Same tokens as the engine stepped by hand, 4xx errors and
aborts across the socket, and a core that goes away ends every stream with 503."""

import asyncio
import threading
from multiprocessing import Pipe

import pytest

from parallel.build import build_engine
from serving.async_engine import AsyncEngine
from serving.config import LLMConfig, ModelConfig, SchedulerConfig
from serving.engine_core import CoreServer, EngineCoreClient, hang_up
from serving.errors import ContextLengthError, UnavailableError
from serving.sampling import SamplingParams

PROMPTS = [[7 + (13 * i + j) % 400 for j in range(4 + 3 * i)] for i in range(6)]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return build_engine(LLMConfig(model=ModelConfig(path=tiny_model), scheduler=SchedulerConfig(
        block_size=4, num_kv_blocks=200, max_num_seqs=4, max_num_batched_tokens=32)))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def start_core(engine):
    """(client, server, server thread): the two ends of one connection, the server in a thread."""
    ours, theirs = Pipe()
    server = CoreServer(engine, theirs, publish_every_s=0.005, step_timeout_s=60)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    return EngineCoreClient(ours, core=None), server, thread


def expected_tokens(engine, max_tokens):
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"sync{i}", prompt, greedy(max_tokens[i]))
    out = {i: [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for o in engine.step()[0]:
            out[int(o.request_id[4:])] += o.token_ids
    engine.take_finished()
    return [out[i] for i in range(len(PROMPTS))]


async def collect(agen) -> list:
    return [o async for o in agen]


def test_streams_through_the_socket_match_the_engine_and_errors_cross_it(engine):
    max_tokens = [5 + 2 * i for i in range(len(PROMPTS))]
    expected = expected_tokens(engine, max_tokens)
    client, server, thread = start_core(engine)
    finished_stats = []

    async def main():
        ae = AsyncEngine(client, max_waiting_requests=64, stream_interval_s=0.01,
                         on_step=lambda stats, done: finished_stats.extend(done))
        try:
            results = await asyncio.gather(*(collect(ae.generate(f"c{i}", p, greedy(max_tokens[i])))
                                             for i, p in enumerate(PROMPTS)))
            with pytest.raises(ContextLengthError):  # found by the core's engine, raised here
                await ae.generate("too-long", [7] * 10_000, greedy(4)).__anext__()
            # an abandoned stream is aborted in the core: its blocks come back
            agen = ae.generate("abandoned", PROMPTS[0], greedy(500))
            await agen.__anext__()
            await agen.aclose()
            for _ in range(400):
                if not engine.has_unfinished():
                    break
                await asyncio.sleep(0.01)
            return results
        finally:
            ae.shutdown()

    results = asyncio.run(main())
    thread.join(10)
    assert not thread.is_alive(), "the core stops when its client hangs up"
    for outs, want, n in zip(results, expected, max_tokens):
        assert [t for o in outs for t in o.token_ids] == want
        assert outs[-1].finished and outs[-1].num_output_tokens == n
    assert sorted(s.num_output_tokens for s in finished_stats if s.finish_reason == "length") == sorted(max_tokens)
    assert not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_core_that_goes_away_ends_every_stream_with_503(engine):
    client, server, thread = start_core(engine)

    async def main():
        ae = AsyncEngine(client, max_waiting_requests=64)
        try:
            agen = ae.generate("doomed", PROMPTS[1], greedy(500))
            await agen.__anext__()
            hang_up(server.conn)  # the core's process died: its end of the socket closes
            with pytest.raises(UnavailableError):
                async for _ in agen:
                    pass
            assert ae.error is not None
            with pytest.raises(UnavailableError):  # and it stays failed: the replica is unhealthy
                await ae.generate("after", PROMPTS[0], greedy(2)).__anext__()
        finally:
            ae.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))
    thread.join(10)
    for request_id in list(engine._seqs):
        engine.abort(request_id)


def test_a_failed_core_is_replaced_requests_without_output_move_and_new_ones_wait(engine):
    first_client, first_server, first_thread = start_core(engine)
    restarted = []

    async def restart():
        await asyncio.sleep(0.3)  # a new process loading
        for request_id in list(engine._seqs):  # what the dead core held is gone with it
            engine.abort(request_id)
        client, server, thread = start_core(engine)
        restarted.append(thread)
        return client

    async def main():
        ae = AsyncEngine(first_client, max_waiting_requests=64, restart=restart, restart_timeout_s=10)
        try:
            # max_num_seqs is 4: four long requests run, a fifth waits unscheduled (no output yet)
            running = [ae.generate(f"running{i}", PROMPTS[i], greedy(300)) for i in range(4)]
            for agen in running:
                await agen.__anext__()
            queued = asyncio.ensure_future(collect(ae.generate("queued", PROMPTS[4], greedy(6))))
            await asyncio.sleep(0.2)
            hang_up(first_server.conn)  # the core's process died
            for agen in running:  # they had sent tokens: each ends with an error
                with pytest.raises(UnavailableError):
                    async for _ in agen:
                        pass
            assert ae.rebuilding
            late = await collect(ae.generate("late", PROMPTS[5], greedy(5)))  # held, then served
            assert late[-1].finished and late[-1].num_output_tokens == 5
            moved = await asyncio.wait_for(queued, 20)  # retried on the new core, transparently
            assert moved[-1].finished and moved[-1].num_output_tokens == 6
            assert ae.error is None and ae.num_restarts == 1 and not ae.rebuilding
        finally:
            ae.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))
    for thread in [first_thread, *restarted]:
        thread.join(10)
    for request_id in list(engine._seqs):
        engine.abort(request_id)

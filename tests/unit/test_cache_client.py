"""The router's cache client: a late call is a miss and is abandoned, never cancelled (cancelling a
call over Serve's gRPC transport leaks memory, grpc/grpc#43360), and a lookup tells the cache its budget.
Stand-in handles: the client's timing logic needs no Serve here (test_faults.py runs the real one)."""

import asyncio

from deployments.cache_client import CacheClient
from serving.config import CacheConfig
from serving.protocol import ChatCompletionRequest


class Counts:
    def __init__(self):
        self.skips = []

    def record_cache_skip(self, call, reason):
        self.skips.append((call, reason))


class SlowHandle:
    """What `handle.lookup.remote(...)` returns is awaited; here each call sleeps `delay_s`."""

    def __init__(self, delay_s):
        self.delay_s = delay_s
        self.calls, self.finished, self.cancelled = [], 0, 0

    @property
    def lookup(self):
        return self

    insert = lookup

    def remote(self, *args):
        self.calls.append(args)
        return self._run()

    async def _run(self):
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return None


def request(text="how do I sort a list?"):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": text}], temperature=0.0)


def test_late_lookup_is_a_miss_and_its_call_is_left_to_finish():
    async def go():
        handle, counts = SlowHandle(0.3), Counts()
        client = CacheClient([handle], CacheConfig(timeout_s=0.05, max_timeout_s=0.05), counts)
        key, query, _ = client.lookup_args(request(), None)
        assert await client.lookup(key, query) is None
        assert counts.skips == [("lookup", "timeout")]
        assert handle.calls[0][-1] == 0.05  # the cache is told the router's budget
        assert len(client._background) == 1 and handle.cancelled == 0
        await asyncio.sleep(0.4)
        assert handle.finished == 1 and handle.cancelled == 0 and not client._background
    asyncio.run(go())


def test_a_cancelled_request_leaves_its_lookup_running():
    async def go():
        handle = SlowHandle(0.2)
        client = CacheClient([handle], CacheConfig(timeout_s=1.0, max_timeout_s=1.0), Counts())
        key, query, _ = client.lookup_args(request(), None)
        waiting = asyncio.ensure_future(client.lookup(key, query))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the client went away
        await asyncio.sleep(0.3)
        assert handle.finished == 1 and handle.cancelled == 0 and not client._background
    asyncio.run(go())


def test_fast_lookup_answers():
    async def go():
        handle = SlowHandle(0.0)
        client = CacheClient([handle], CacheConfig(timeout_s=0.5, max_timeout_s=0.5), Counts())
        key, query, _ = client.lookup_args(request(), None)
        assert await client.lookup(key, query) is None and handle.finished == 1 and not client._background
    asyncio.run(go())

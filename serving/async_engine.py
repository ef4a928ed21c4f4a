"""The engine behind an asyncio event loop: one stream per request, fed by the engine core.

The engine core (`serving.engine_core.StepLoop`) steps the engine on a thread of its own, in this
process (`AsyncEngine(engine)`) or in a process of its own (`AsyncEngine(EngineCoreClient)`, the
Serve replica's default). Each step's outputs, and the stats of the requests that ended, reach the
event loop in one callback. So the event loop never blocks on a forward pass, and the next step
never waits for the event loop.

When the engine fails (a step raised or hung, a rank or the core's process died), the requests that
already had output end with 503. With a `restart` (the Serve replica's engine process), a new core
takes over: the requests without output move to it and new ones wait for it. Without one the
engine stays failed, so the health check fails and Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Awaitable, Callable, Optional, Union

from serving.engine import LLMEngine
from serving.engine_core import EngineCoreClient, StepLoop
from serving.errors import InvalidRequestError, OverloadedError, ServingError, UnavailableError
from serving.protocol import GenerationOutput, merge_outputs
from serving.sampling import SamplingParams
from serving.stats import RequestStats, StepStats

logger = logging.getLogger(__name__)


class _Stream:
    """One request's outputs on the event loop: what the step thread produced and the consumer has
    not taken yet, merged into one item (fewer, bigger items when the consumer is slower)."""

    __slots__ = ("pending", "error", "wake", "holding", "retry")

    def __init__(self):
        self.pending: list[GenerationOutput] = []  # outputs not yet taken, oldest first
        self.error: Optional[BaseException] = None
        self.wake = asyncio.Event()  # set when the consumer should look
        self.holding = False  # the consumer is spacing its items (see AsyncEngine.generate)
        # The request's add() arguments while it may still move to a new engine core (no output yet,
        # not moved before); None otherwise.
        self.retry: Optional[tuple] = None

    def add(self, out: GenerationOutput) -> None:
        self.pending.append(out)
        self.retry = None
        if not self.holding or out.finished:  # NOTE: a finished request's last item never waits
            self.wake.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.wake.set()

    def take(self) -> GenerationOutput:
        out = merge_outputs(self.pending)
        self.pending = []
        return out


class AsyncEngine:
    def __init__(self, engine: Union[LLMEngine, EngineCoreClient], max_waiting_requests: int,
                 on_step: Optional[Callable[[StepStats, list[RequestStats]], None]] = None,
                 stream_interval_s: float = 0.0, max_stream_items_per_s: float = 0.0,
                 step_timeout_s: float = 120.0,
                 restart: Optional[Callable[[], Awaitable[EngineCoreClient]]] = None,
                 restart_timeout_s: float = 120.0):
        # An LLMEngine is stepped by a thread of this process; an EngineCoreClient's engine by a
        # thread of the core's process (built with the same stream_interval_s and step_timeout_s).
        self.engine = engine
        # A new engine core when the current one fails (a rank or the core's process died): the
        # requests that had no output yet go to it, new ones wait for it (`_rebuild`). Without it a
        # failed engine stays failed and the replica unhealthy.
        self.restart = restart
        self.restart_timeout_s = restart_timeout_s
        self._rebuilding: Optional[asyncio.Task] = None
        self._ready = asyncio.Event()  # NOTE: created outside a loop; Python >= 3.10 binds it on first use
        self._ready.set()
        self.num_restarts = 0
        # Minimum time between two items of one stream: every stream item costs CPU in every Serve
        # hop, so tokens go out in small groups, bigger ones when many streams share the replica
        # (`_stream_interval`). The first item and a finished request's last item never wait.
        self.stream_interval_s = stream_interval_s
        self.max_stream_items_per_s = max_stream_items_per_s
        self.max_waiting_requests = max_waiting_requests
        self.step_timeout_s = step_timeout_s
        # Called on the event loop after each step with its stats and the stats of the requests
        # that ended; also when only aborts were applied (stats of no step: num_seqs 0).
        self.on_step = on_step
        self._streams: dict[str, _Stream] = {}  # event-loop side only
        self._core: Union[StepLoop, EngineCoreClient, None] = None  # started by the first request
        self._sink: Optional[_LoopSink] = None
        self.error: Optional[BaseException] = None  # set when the engine failed: the replica is unhealthy
        self.stopped: Optional[ServingError] = None  # set by `drain`: what new requests get

    @property
    def num_pending(self) -> int:
        """Requests not yet scheduled (the admission limit counts these)."""
        return self._core.num_pending if self._core is not None else 0

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[GenerationOutput]:
        """Streams the request's outputs; the last one has `finished=True`. Cancelling aborts it."""
        if self._rebuilding is not None:  # held, not refused, while a new engine core starts
            try:
                await asyncio.wait_for(self._ready.wait(), self.restart_timeout_s)
            except TimeoutError:
                pass
        if self.stopped is not None:
            raise self.stopped
        if self.error is not None:
            raise UnavailableError(f"engine failed: {self.error}")
        if self.num_pending >= self.max_waiting_requests:
            raise OverloadedError(f"{self.num_pending} requests are already waiting", retry_after=2.0)
        if request_id in self._streams:
            raise InvalidRequestError(f"duplicate request id {request_id!r}: one is already in flight")
        if isinstance(self.engine, LLMEngine):  # 4xx now, not from inside the loop (the core's: its first item)
            self.engine.check_request(prompt_token_ids, params)
        stream = _Stream()
        self._streams[request_id] = stream
        self._ensure_core()
        args = (request_id, prompt_token_ids, params, time.monotonic())
        if self.restart is not None:
            stream.retry = args
        self._core.add(*args)
        finished = False
        try:
            while True:
                if not stream.pending and stream.error is None:
                    stream.wake.clear()
                    await stream.wake.wait()
                if not stream.pending:  # NOTE: tokens produced before a failure go out first
                    raise stream.error
                item = stream.take()
                finished = item.finished
                yield item
                if finished:
                    return
                interval = self._stream_interval()
                if interval > 0:  # space the items out; a finish or an error cuts the wait short
                    stream.holding = True
                    stream.wake.clear()
                    try:
                        async with asyncio.timeout(interval):
                            await stream.wake.wait()
                    except TimeoutError:
                        pass
                    stream.holding = False
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not finished:
                self._core.abort(request_id)

    @property
    def num_streams(self) -> int:
        """Requests in flight (queued or generating, with a consumer)."""
        return len(self._streams)

    async def drain(self, timeout_s: float, error: ServingError) -> int:
        """Lets the requests in flight finish for up to `timeout_s`, then ends the rest with `error`
        (after the tokens they already have); new requests get `error` from then on. Returns how
        many were ended."""
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.stopped = error
        left = list(self._streams.values())
        for stream in left:
            stream.fail(error)
        return len(left)

    def _stream_interval(self) -> float:
        """Seconds between a stream's items: at least `stream_interval_s`, and long enough that
        all open streams together send at most `max_stream_items_per_s` items a second."""
        if self.max_stream_items_per_s <= 0:
            return self.stream_interval_s
        return max(self.stream_interval_s, len(self._streams) / self.max_stream_items_per_s)

    def _ensure_core(self) -> None:
        if self._core is None:
            self._sink = _LoopSink(self, asyncio.get_running_loop())
            if isinstance(self.engine, EngineCoreClient):
                self.engine.start(self._sink)
                self._core = self.engine
            else:
                self._core = StepLoop(self.engine, self._sink, 0.25 * self.stream_interval_s, self.step_timeout_s)

    # ---- event-loop side ------------------------------------------------------------------------

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.fail(error)

    def _publish(self, sink: "_LoopSink", outputs: list[GenerationOutput], stats: StepStats,
                 finished: list[RequestStats]) -> None:
        sink.taken.set()
        if sink is not self._sink:  # a failed core's last words
            return
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is not None:
                stream.add(out)
        if self.on_step is not None:
            self.on_step(stats, finished)

    @property
    def rebuilding(self) -> bool:
        return self._rebuilding is not None

    def core_failed(self, e: BaseException) -> None:
        """The owner found the engine core broken (a failed health check): as if it had said so."""
        self._ensure_core()
        self._core_failed(self._sink, e)

    def _core_failed(self, sink: "_LoopSink", e: BaseException) -> None:
        """The engine core failed: rebuild it (if we can), else fail everything and stay failed."""
        if sink is not self._sink or self._rebuilding is not None:
            return
        error = e if isinstance(e, ServingError) else UnavailableError(f"engine failed: {e}")
        if self.restart is None:
            self.error = e
            for stream in self._streams.values():
                stream.fail(error)
            return
        logger.error("engine core failed (%s): starting a new one", e)
        for stream in self._streams.values():
            if stream.retry is None:  # it had output (or moved once already): it ends here, with what it has
                stream.fail(error)
        self._ready.clear()
        self._rebuilding = asyncio.get_running_loop().create_task(self._rebuild(e))

    async def _rebuild(self, cause: BaseException) -> None:
        """A new engine core; the requests that had no output yet go to it, once."""
        self._sink.closed.set()
        self.engine.close()
        try:
            client = await asyncio.wait_for(self.restart(), self.restart_timeout_s)
        except Exception as e:
            logger.exception("the engine core could not be restarted")
            self.error = e
            for stream in self._streams.values():
                stream.fail(UnavailableError(f"engine failed ({cause}) and could not be restarted: {e}"))
        else:
            self.engine, self._core = client, None
            self._ensure_core()
            moved = [stream for stream in self._streams.values() if stream.retry is not None]
            for stream in moved:
                args, stream.retry = stream.retry, None  # NOTE: one move per request
                self._core.add(*args)
            self.num_restarts += 1
            logger.info("engine core restarted; %d waiting requests moved to it", len(moved))
        finally:
            self._rebuilding = None
            self._ready.set()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stops the engine core's threads (this process's, or the reader of the core's socket)."""
        if self._sink is not None:
            self._sink.closed.set()
        if isinstance(self._core, StepLoop):
            self._core.close(timeout_s)
        elif isinstance(self.engine, EngineCoreClient):
            self.engine.close()


class _LoopSink:
    """Hands the engine core's results to the event loop (a `StepSink`, called from the core's
    step thread, or from the reader of its socket).

    NOTE: `taken` is set when the event loop has taken the last hand-over. The next one waits for
    it, so results never pile up in callbacks that the loop has not run yet, and a fast step (a
    tiny model, an accelerator) cannot starve the loop of the GIL."""

    def __init__(self, owner: AsyncEngine, loop: asyncio.AbstractEventLoop):
        self.owner = owner
        self.loop = loop
        self.taken = threading.Event()
        self.taken.set()
        self.closed = threading.Event()

    def outputs(self, outputs, stats, finished) -> bool:
        while not self.taken.wait(timeout=0.5):
            if self.closed.is_set():
                return False
        if self.closed.is_set():
            return False
        self.taken.clear()
        self.loop.call_soon_threadsafe(self.owner._publish, self, outputs, stats, finished)
        return True

    def request_error(self, request_id, error) -> None:
        self.loop.call_soon_threadsafe(self.owner._deliver_error, request_id, error)

    def failed(self, error) -> None:
        if not self.closed.is_set():
            self.loop.call_soon_threadsafe(self.owner._core_failed, self, error)

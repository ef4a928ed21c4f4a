"""The engine behind an asyncio event loop: a step thread, a watchdog, and one stream per request.

The engine is single-threaded: one dedicated thread runs `step()` back to back, and requests are
added and aborted only between steps (queued under a lock by the event loop, applied by the step
thread). Each step's outputs, and the stats of the requests that ended, go to the event loop in
one callback. So the event loop never blocks on a forward pass, the next step never waits for the
event loop, and the engine's state is touched by one thread only.

A watchdog thread turns a hung step (a rank that died inside a collective) into an error: every
request in flight ends with 503 and the engine stays failed, so the health check fails and Serve
replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable, Optional

from serving.engine import LLMEngine
from serving.errors import InvalidRequestError, OverloadedError, ServingError, UnavailableError
from serving.protocol import GenerationOutput
from serving.sampling import SamplingParams
from serving.stats import RequestStats, StepStats

logger = logging.getLogger(__name__)

# A step running longer than this gets its ranks pinged by the watchdog (`executor.check_health`).
PROBE_AFTER_S = 2.0


class _Stream:
    """One request's outputs on the event loop: what the step thread produced and the consumer has
    not taken yet, merged into one item (fewer, bigger items when the consumer is slower)."""

    __slots__ = ("texts", "token_ids", "logprobs", "prompt_logprobs", "last", "error", "wake", "holding")

    def __init__(self):
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list = []  # of the merged outputs, when the request asked for them
        self.prompt_logprobs = None
        self.last: Optional[GenerationOutput] = None  # the newest output not yet taken
        self.error: Optional[BaseException] = None
        self.wake = asyncio.Event()  # set when the consumer should look
        self.holding = False  # the consumer is spacing its items (see AsyncEngine.generate)

    def add(self, out: GenerationOutput) -> None:
        self.texts.append(out.text)
        self.token_ids += out.token_ids
        if out.logprobs is not None:
            self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.last = out
        if not self.holding or out.finished:  # NOTE: a finished request's last item never waits
            self.wake.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.wake.set()

    def take(self) -> GenerationOutput:
        out, self.last = self.last, None
        if len(self.texts) > 1:
            out = GenerationOutput(out.request_id, "".join(self.texts), self.token_ids, out.finished,
                                   out.finish_reason, out.num_prompt_tokens, out.num_output_tokens,
                                   self.logprobs if out.logprobs is not None else None, self.prompt_logprobs)
        self.texts, self.token_ids, self.logprobs, self.prompt_logprobs = [], [], [], None
        return out


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int,
                 on_step: Optional[Callable[[StepStats, list[RequestStats]], None]] = None,
                 stream_interval_s: float = 0.0, max_stream_items_per_s: float = 0.0,
                 step_timeout_s: float = 120.0):
        self.engine = engine
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
        self._lock = threading.Lock()  # guards _to_add and _to_abort
        self._to_add: list[tuple] = []
        self._to_abort: set[str] = set()
        self._work = threading.Event()
        # NOTE: set when the event loop has taken the last step's outputs. The step thread waits
        # for it before handing over the next step's, so it never runs more than one step ahead
        # of the event loop: a fast step (a tiny model, an accelerator) cannot starve the loop of
        # the GIL, and outputs never pile up in callbacks that the loop has not run yet.
        self._taken = threading.Event()
        self._taken.set()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closed = threading.Event()  # set by shutdown(): stops both threads, wakes the watchdog at once
        self._watchdog: Optional[threading.Thread] = None
        self._step_started: Optional[float] = None  # monotonic start of the step in flight, if any
        self.error: Optional[BaseException] = None  # set when a step failed: the replica is unhealthy

    @property
    def num_pending(self) -> int:
        return len(self._to_add) + self.engine.num_waiting

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[GenerationOutput]:
        """Streams the request's outputs; the last one has `finished=True`. Cancelling aborts it."""
        if self.error is not None:
            raise UnavailableError(f"engine failed: {self.error}")
        if self.num_pending >= self.max_waiting_requests:
            raise OverloadedError(f"{self.num_pending} requests are already waiting", retry_after=2.0)
        if request_id in self._streams:
            raise InvalidRequestError(f"duplicate request id {request_id!r}: one is already in flight")
        self.engine.check_request(prompt_token_ids, params)  # 4xx now, not from inside the loop
        stream = _Stream()
        self._streams[request_id] = stream
        with self._lock:
            self._to_add.append((request_id, prompt_token_ids, params, time.monotonic()))
        self._ensure_threads()
        self._work.set()
        finished = False
        try:
            while True:
                if stream.last is None and stream.error is None:
                    stream.wake.clear()
                    await stream.wake.wait()
                if stream.last is None:  # NOTE: tokens produced before a failure go out first
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
                with self._lock:
                    self._to_abort.add(request_id)
                self._work.set()

    def _stream_interval(self) -> float:
        """Seconds between a stream's items: at least `stream_interval_s`, and long enough that
        all open streams together send at most `max_stream_items_per_s` items a second."""
        if self.max_stream_items_per_s <= 0:
            return self.stream_interval_s
        return max(self.stream_interval_s, len(self._streams) / self.max_stream_items_per_s)

    def _ensure_threads(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
            self._thread.start()
            self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
            self._watchdog.start()

    # ---- step thread ----------------------------------------------------------------------------

    def _apply_pending(self) -> None:
        """Adds and aborts queued since the last step."""
        with self._lock:
            adds, self._to_add = self._to_add, []
            aborts, self._to_abort = self._to_abort, set()
        for request_id, ids, params, arrival in adds:
            if request_id in aborts:
                continue
            try:
                self.engine.add_request(request_id, ids, params, arrival)
            except ServingError as e:
                self._loop.call_soon_threadsafe(self._deliver_error, request_id, e)
        for request_id in aborts:
            self.engine.abort(request_id)

    def _run(self) -> None:
        """Step while there is work, sleep on `_work` while there is none.

        NOTE: outputs go to the event loop at once when they start or end a request; middle ones
        wait up to a quarter of `stream_interval_s` to go with the next steps' (the streams space
        their items by the whole interval anyway). Each hand-over wakes the loop and contends for
        the GIL with this thread: at a fast step that was a tenth of a served token's time."""
        publish_every_s = 0.25 * self.stream_interval_s
        held: list[GenerationOutput] = []
        last_publish = 0.0
        while not self._closed.is_set() and self.error is None:
            self._apply_pending()
            if not self.engine.has_unfinished():
                finished = self.engine.take_finished()  # aborted before or between steps
                if finished and self.on_step is not None:
                    self._loop.call_soon_threadsafe(self.on_step, self.engine.current_stats(), finished)
                self._work.wait(timeout=1.0)
                self._work.clear()  # NOTE: work queued before a set() is picked up by the next _apply_pending
                continue
            self._step_started = time.monotonic()
            try:
                outputs, stats = self.engine.step()
            except Exception as e:  # a rank died or failed: fail everything in flight, stay unhealthy
                logger.exception("engine step failed")
                self._fail(e)
                return
            finally:
                self._step_started = None
            if self.error is not None:  # the watchdog gave up on this step while it ran
                return
            held += outputs
            now = time.monotonic()
            if (now - last_publish < publish_every_s and self.engine.has_unfinished()
                    and not any(o.finished or len(o.token_ids) == o.num_output_tokens for o in outputs)):
                continue
            while not self._taken.wait(timeout=0.5):
                if self._closed.is_set():
                    return
            self._taken.clear()
            self._loop.call_soon_threadsafe(self._publish, held, stats, self.engine.take_finished())
            held, last_publish = [], now

    # ---- watchdog thread ------------------------------------------------------------------------

    def _watch(self) -> None:
        """Fails the engine when a step hangs: past `step_timeout_s`, or once a long step's ranks
        do not all answer a ping. NOTE: it cannot stop the stuck step; it ends the requests and
        makes the replica unhealthy so that Serve replaces it."""
        while not self._closed.wait(0.5) and self.error is None:
            started = self._step_started
            if started is None:
                continue
            elapsed = time.monotonic() - started
            if elapsed > self.step_timeout_s:
                self._fail(UnavailableError(f"an engine step hung for more than {self.step_timeout_s:.0f} s"))
            elif elapsed > PROBE_AFTER_S:
                try:
                    self.engine.executor.check_health()
                except Exception as e:
                    if self._step_started == started:
                        self._fail(UnavailableError(f"a rank stopped answering during a step: {e}"))

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, e)

    # ---- event-loop side ------------------------------------------------------------------------

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.fail(error)

    def _publish(self, outputs: list[GenerationOutput], stats: StepStats, finished: list[RequestStats]) -> None:
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is not None:
                stream.add(out)
        self._taken.set()
        if self.on_step is not None:
            self.on_step(stats, finished)

    def _fail_all(self, e: BaseException) -> None:
        for stream in self._streams.values():
            stream.fail(e if isinstance(e, ServingError) else UnavailableError(f"engine failed: {e}"))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stops the step and watchdog threads; waits up to `timeout_s` for a step in flight.

        NOTE: joined, not left running: a daemon thread that wakes while the interpreter exits can
        abort the process ("terminate called without an active exception", seen with the watchdog
        sleeping at exit)."""
        self._closed.set()
        self._work.set()
        for thread in (self._thread, self._watchdog):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout_s)

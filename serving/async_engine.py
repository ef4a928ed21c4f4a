"""The engine behind an asyncio event loop: a step thread plus one stream per request.

The engine is single-threaded: one dedicated thread runs `step()` back to back, and requests are
added and aborted only between steps (queued under a lock by the event loop, applied by the step
thread). Each step's outputs go to the event loop in one callback. So the event loop never blocks
on a forward pass, the next step never waits for the event loop, and the engine never sees two threads.
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
from serving.stats import StepStats

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int,
                 on_step: Optional[Callable[[StepStats, LLMEngine], None]] = None, stream_interval_s: float = 0.0,
                 max_stream_items_per_s: float = 0.0):
        self.engine = engine
        # Minimum time between two items of one stream (the first goes out at once): every stream
        # item costs CPU in every Serve hop, so tokens are sent in small groups (Ray Serve LLM:
        # 50 ms), and in bigger groups when many streams share the replica (`_stream_interval`).
        self.stream_interval_s = stream_interval_s
        self.max_stream_items_per_s = max_stream_items_per_s
        self.max_waiting_requests = max_waiting_requests
        self.on_step = on_step  # called on the event loop after each step
        self._streams: dict[str, asyncio.Queue] = {}  # event-loop side only
        self._lock = threading.Lock()  # guards _to_add and _to_abort
        self._to_add: list[tuple] = []
        self._to_abort: set[str] = set()
        self._work = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopped = False
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
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        with self._lock:
            self._to_add.append((request_id, prompt_token_ids, params, time.monotonic()))
        self._ensure_thread()
        self._work.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                # NOTE: outputs that piled up while the consumer was busy go out as one (fewer,
                # bigger stream items under load; one item per token when the consumer keeps up).
                while not isinstance(item, BaseException) and not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        queue.put_nowait(nxt)
                        break
                    item = _merge(item, nxt)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
                interval = self._stream_interval()
                if interval > 0:
                    await asyncio.sleep(interval)
        finally:
            if self._streams.get(request_id) is queue:
                del self._streams[request_id]
            if not finished:
                with self._lock:
                    self._to_abort.add(request_id)
                self._work.set()

    def _stream_interval(self) -> float:
        """Seconds before a stream's next item: at least `stream_interval_s`, and long enough that
        all open streams together send at most `max_stream_items_per_s` items a second."""
        if self.max_stream_items_per_s <= 0:
            return self.stream_interval_s
        return max(self.stream_interval_s, len(self._streams) / self.max_stream_items_per_s)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
            self._thread.start()

    def _apply_pending(self) -> None:
        """Step thread: adds and aborts queued since the last step."""
        with self._lock:
            adds, self._to_add = self._to_add, []
            aborts, self._to_abort = self._to_abort, set()
        for request_id, ids, params, arrival in adds:
            if request_id in aborts:
                continue
            try:
                self.engine.add_request(request_id, ids, params, arrival)
            except ServingError as e:
                self._loop.call_soon_threadsafe(self._deliver, request_id, e)
        for request_id in aborts:
            self.engine.abort(request_id)

    def _run(self) -> None:
        """Step thread: step while there is work, sleep on `_work` while there is none."""
        while not self._stopped:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self._work.wait(timeout=1.0)
                self._work.clear()  # NOTE: work queued before a set() is picked up by the next _apply_pending
                continue
            try:
                outputs, stats = self.engine.step()
            except Exception as e:  # a rank died or hung: fail everything in flight, stay unhealthy
                logger.exception("engine step failed")
                self.error = e
                self._loop.call_soon_threadsafe(self._fail_all, e)
                return
            self._loop.call_soon_threadsafe(self._publish, outputs, stats)

    # ---- event-loop side ----------------------------------------------------------------------

    def _deliver(self, request_id: str, item) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _publish(self, outputs: list[GenerationOutput], stats: StepStats) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)
        if self.on_step is not None:
            self.on_step(stats, self.engine)

    def _fail_all(self, e: BaseException) -> None:
        for request_id in list(self._streams):
            self._deliver(request_id, UnavailableError(f"engine failed: {e}"))

    def shutdown(self) -> None:
        self._stopped = True
        self._work.set()


def _merge(a: GenerationOutput, b: GenerationOutput) -> GenerationOutput:
    """`a` then `b` as one output."""
    return b.model_copy(update={"text": a.text + b.text, "token_ids": a.token_ids + b.token_ids})

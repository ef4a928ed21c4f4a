"""The engine core: the thread that steps the engine, and the two places it can run.

`StepLoop` owns an `LLMEngine` and one thread that runs `step()` back to back; requests are added
and aborted only between steps (queued under a lock, applied by the step thread), so the engine's
state is touched by that thread only. Each step's outputs, and the stats of the requests that
ended, go to a sink in one call. A watchdog thread turns a hung step (a rank that died inside a
collective) into an error.

It runs either in the caller's process (`AsyncEngine(engine)`: tests, benchmarks) or in a process
of its own next to a Serve replica (`serve_connection` here, the Ray actor in
parallel/engine_process.py), talking to the replica's `EngineCoreClient` over one local socket.
NOTE: why a process of its own: a forward pass of a small model is thousands of short torch
calls, and each one takes the GIL back. In the replica's process the GIL also serves Ray Serve's
streaming (its event loops and gRPC threads), and every re-acquisition then waits for them:
measured here, a Python thread busy a third of the time in the engine's process cut the engine's
tokens/s at 128 sequences to 0.70x; served, the replica reached 0.67x of the engine alone.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import threading
import time
from typing import Optional, Protocol

from serving.engine import LLMEngine
from serving.errors import ServingError, UnavailableError
from serving.protocol import GenerationOutput, merge_outputs
from serving.sampling import SamplingParams
from serving.stats import RequestStats, StepStats

logger = logging.getLogger(__name__)

# A step running longer than this gets its ranks pinged by the watchdog (`engine.check_health`).
PROBE_AFTER_S = 2.0


class StepSink(Protocol):
    """Where a `StepLoop` hands its results, from its step thread (or the watchdog, for `failed`)."""

    def outputs(self, outputs: list[GenerationOutput], stats: StepStats, finished: list[RequestStats]) -> bool:
        """One or more steps' outputs; returns False when the loop should stop (the sink closed)."""
        ...

    def request_error(self, request_id: str, error: ServingError) -> None:
        """A request could not be added (a 4xx found by the engine)."""
        ...

    def failed(self, error: BaseException) -> None:
        """The engine failed (a step raised or hung): every request in flight ends with this error."""
        ...


class StepLoop:
    def __init__(self, engine: LLMEngine, sink: StepSink, publish_every_s: float = 0.0,
                 step_timeout_s: float = 120.0):
        self.engine = engine
        self.sink = sink
        # NOTE: an output that starts or ends a request goes to the sink at once; middle ones wait up
        # to `publish_every_s` (the streams space their items by more than that anyway), merged per
        # request: each hand-over costs the consumer a wake-up, and each output a pickle and a
        # stream update (at 64 streams every step started or ended one, so nothing waited before).
        self.publish_every_s = publish_every_s
        self.step_timeout_s = step_timeout_s
        self._lock = threading.Lock()  # guards _to_add and _to_abort
        self._to_add: list[tuple] = []
        self._to_abort: set[str] = set()
        self._work = threading.Event()
        self._closed = threading.Event()  # set by close(): stops both threads, wakes the watchdog at once
        self._step_started: Optional[float] = None  # monotonic start of the step in flight, if any
        self.error: Optional[BaseException] = None  # set when a step failed: the engine is unusable
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
        self._thread.start()
        self._watchdog.start()

    # ---- any thread -----------------------------------------------------------------------------

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: float) -> None:
        with self._lock:
            self._to_add.append((request_id, prompt_token_ids, params, arrival))
        self._work.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._to_abort.add(request_id)
        self._work.set()

    @property
    def num_pending(self) -> int:
        """Requests not yet scheduled: queued here, and waiting in the engine."""
        return len(self._to_add) + self.engine.num_waiting

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the step and watchdog threads; waits up to `timeout_s` for a step in flight.

        NOTE: joined, not left running: a daemon thread that wakes while the interpreter exits can
        abort the process ("terminate called without an active exception", seen with the watchdog
        sleeping at exit)."""
        self._closed.set()
        self._work.set()
        for thread in (self._thread, self._watchdog):
            if thread is not threading.current_thread():
                thread.join(timeout_s)

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
                self.sink.request_error(request_id, e)
        for request_id in aborts:
            self.engine.abort(request_id)

    def _run(self) -> None:
        """Step while there is work, sleep on `_work` while there is none."""
        held: dict[str, list[GenerationOutput]] = {}  # request id -> its outputs not sent yet
        last_publish = 0.0
        while not self._closed.is_set() and self.error is None:
            self._apply_pending()
            if not self.engine.has_unfinished():
                finished = self.engine.take_finished()  # aborted before or between steps
                if finished and not self.sink.outputs([], self.engine.current_stats(), finished):
                    return
                self._work.wait(timeout=1.0)
                self._work.clear()  # NOTE: work queued before a set() is picked up by the next _apply_pending
                continue
            self._step_started = time.monotonic()
            try:
                outputs, stats = self.engine.step()
            except Exception as e:  # a rank died or failed: fail everything in flight, stay failed
                logger.exception("engine step failed")
                self._fail(e)
                return
            finally:
                self._step_started = None
            if self.error is not None:  # the watchdog gave up on this step while it ran
                return
            urgent = []  # requests whose output starts or ends them: these go at once
            for out in outputs:
                held.setdefault(out.request_id, []).append(out)
                if out.finished or len(out.token_ids) == out.num_output_tokens:
                    urgent.append(out.request_id)
            now = time.monotonic()
            if now - last_publish >= self.publish_every_s or not self.engine.has_unfinished():
                send, held, last_publish = list(held.values()), {}, now
            elif urgent:
                send = [held.pop(request_id) for request_id in urgent]
            else:
                continue
            if not self.sink.outputs([self._with_text(merge_outputs(outs)) for outs in send], stats,
                                     self.engine.take_finished()):
                return

    def _with_text(self, out: GenerationOutput) -> GenerationOutput:
        """`out` with the text its tokens left to publishing (LLMEngine.take_text)."""
        if not out.finished:
            out.text += self.engine.take_text(out.request_id)
        return out

    # ---- watchdog thread ------------------------------------------------------------------------

    def _watch(self) -> None:
        """Fails the engine when a step hangs: past `step_timeout_s`, or once a long step's ranks
        do not all answer a ping. NOTE: it cannot stop the stuck step; it ends the requests and
        leaves the engine failed, so that the replica turns unhealthy and Serve replaces it."""
        while not self._closed.wait(0.5) and self.error is None:
            started = self._step_started
            if started is None:
                continue
            elapsed = time.monotonic() - started
            if elapsed > self.step_timeout_s:
                self._fail(UnavailableError(f"an engine step hung for more than {self.step_timeout_s:.0f} s"))
            elif elapsed > PROBE_AFTER_S:
                try:
                    self.engine.check_health()
                except Exception as e:
                    if self._step_started == started:
                        self._fail(UnavailableError(f"a rank stopped answering during a step: {e}"))

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
            self.sink.failed(e)


# ---- the engine in a process of its own: both ends of the socket ---------------------------------
#
# Messages are pickled tuples, one per `Connection.send_bytes`. Both ends are this project's own
# processes on one node (the connection is authenticated; nothing from HTTP is unpickled).
#   client -> core: ("add", request_id, prompt_token_ids, params, arrival) | ("abort", request_id)
#   core -> client: ("outputs", outputs, stats, finished) | ("error", request_id, error) | ("failed", error)


def _send(conn, lock: threading.Lock, message: tuple) -> bool:
    try:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with lock:
            conn.send_bytes(data)
        return True
    except (OSError, EOFError):  # the other end went away
        return False


class _ConnectionSink:
    """A `StepSink` that writes to the client's socket. NOTE: a full socket buffer blocks the
    step thread: a client that cannot keep up slows the engine instead of growing a queue."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()  # the step thread and the watchdog both write

    def outputs(self, outputs, stats, finished) -> bool:
        return _send(self.conn, self.lock, ("outputs", outputs, stats, finished))

    def request_error(self, request_id, error) -> None:
        _send(self.conn, self.lock, ("error", request_id, error))

    def failed(self, error) -> None:
        if not _picklable(error):
            error = UnavailableError(f"engine failed: {error}")
        _send(self.conn, self.lock, ("failed", error))


def listen_unix(prefix: str, serve, thread_name: str) -> tuple[str, bytes]:
    """An authenticated AF_UNIX listener in a fresh temporary folder (on this node), served by
    `serve(listener)` in a daemon thread; returns (address, authkey) for the client."""
    import secrets
    import tempfile
    from multiprocessing.connection import Listener

    authkey = secrets.token_bytes(32)
    address = os.path.join(tempfile.mkdtemp(prefix=f"{prefix}-"), f"{prefix}.sock")
    listener = Listener(address, family="AF_UNIX", authkey=authkey)
    threading.Thread(target=serve, args=(listener,), name=thread_name, daemon=True).start()
    return address, authkey


def hang_up(conn) -> None:
    """Closes a connection so that the other end sees it at once. NOTE: a plain close() does not
    end a recv() blocked in another thread of this process, nor send the other end an EOF while
    that recv holds the socket; shutting the socket down does both."""
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
    except OSError:
        pass
    try:
        conn.close()
    except OSError:  # NOTE: another thread closed it meanwhile (the server's reader, on the EOF this caused)
        pass


def _picklable(error: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
        return True
    except Exception:
        return False


class CoreServer:
    """The core's side: steps `engine` for the client at the other end of `conn` (`serve()` blocks
    reading its commands until it hangs up)."""

    def __init__(self, engine: LLMEngine, conn, publish_every_s: float, step_timeout_s: float):
        self.conn = conn
        self.loop = StepLoop(engine, _ConnectionSink(conn), publish_every_s, step_timeout_s)

    def serve(self) -> None:
        try:
            while True:
                try:
                    message = pickle.loads(self.conn.recv_bytes())
                except (OSError, EOFError):
                    return
                if message[0] == "add":
                    self.loop.add(*message[1:])
                elif message[0] == "abort":
                    self.loop.abort(message[1])
        finally:
            self.loop.close()
            hang_up(self.conn)


class EngineCoreClient:
    """The replica's side: what `AsyncEngine` needs of a `StepLoop` that runs in another process.

    Commands go out on the caller's thread (the event loop: a send of a few hundred bytes); one
    reader thread takes the core's messages and hands them to `sink`, several at a time when they
    arrive faster than the sink takes them. `core` is the process's handle (health, shutdown)."""

    def __init__(self, conn, core):
        self.conn = conn
        self.core = core
        self._send_lock = threading.Lock()
        self._num_waiting = 0  # the core's waiting requests in its last stats
        self._sent_since_stats = 0  # adds sent since then
        self.error: Optional[BaseException] = None
        self._sink: Optional[StepSink] = None
        self._reader: Optional[threading.Thread] = None

    def start(self, sink: StepSink) -> None:
        self._sink = sink
        self._reader = threading.Thread(target=self._read, name="engine-core-reader", daemon=True)
        self._reader.start()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: float) -> None:
        self._sent_since_stats += 1
        if not _send(self.conn, self._send_lock, ("add", request_id, prompt_token_ids, params, arrival)):
            self._lost(UnavailableError("the engine process is gone"))

    def abort(self, request_id: str) -> None:
        _send(self.conn, self._send_lock, ("abort", request_id))

    @property
    def num_pending(self) -> int:
        return self._num_waiting + self._sent_since_stats

    def _read(self) -> None:
        conn, sink = self.conn, self._sink
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (OSError, EOFError):
                self._lost(UnavailableError("the engine process is gone"))
                return
            kind = message[0]
            if kind == "outputs":
                outputs, stats, finished = message[1:]
                # several steps' messages waiting: one hand-over (the sink keeps the newest stats)
                while conn.poll(0):
                    try:
                        more = pickle.loads(conn.recv_bytes())
                    except (OSError, EOFError):
                        break
                    if more[0] != "outputs":
                        self._dispatch(more)
                        continue
                    outputs += more[1]  # NOTE: fresh lists from the unpickler: extended in place
                    finished += more[3]
                    stats = more[2]
                self._num_waiting, self._sent_since_stats = stats.num_waiting, 0
                if not sink.outputs(outputs, stats, finished):
                    return
            else:
                self._dispatch(message)

    def _dispatch(self, message: tuple) -> None:
        if message[0] == "error":
            self._sink.request_error(message[1], message[2])
        elif message[0] == "failed":
            self._lost(message[1])

    def _lost(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            if self._sink is not None:
                self._sink.failed(error)

    def close(self) -> None:
        hang_up(self.conn)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5.0)

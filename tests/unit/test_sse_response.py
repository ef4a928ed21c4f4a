"""The router's SSE response: the last line closes the body in one message, and a client that
goes away ends the stream at once (its generator closed), however long the model would still take."""

from __future__ import annotations

import asyncio

from deployments.router import DONE, SSEResponse


def run(lines, disconnect_after: int):
    """Serves `lines` (an async generator) to a client that disconnects after `disconnect_after`
    body messages; returns the messages sent."""
    sent, bodies = [], asyncio.Event()

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and sum(m["type"] == "http.response.body" for m in sent) >= \
                disconnect_after:
            bodies.set()

    async def receive():
        await bodies.wait()
        return {"type": "http.disconnect"}

    async def main():
        response = SSEResponse(lines, media_type="text/event-stream")
        await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=5)
        assert not asyncio.current_task().cancelling()  # the disconnect did not leak as a cancellation

    asyncio.run(main())
    return sent


def test_the_last_line_closes_the_body_in_the_same_message():
    async def lines():
        yield "data: 1\n\n"
        yield "data: 2\n\n" + DONE

    sent = run(lines(), disconnect_after=10**6)
    bodies = [(m["body"], m["more_body"]) for m in sent if m["type"] == "http.response.body"]
    assert bodies == [(b"data: 1\n\n", True), (("data: 2\n\n" + DONE).encode(), False)]


def test_a_client_that_goes_away_closes_a_stream_that_waits_for_the_model():
    closed = []

    async def lines():
        try:
            yield "data: 1\n\n"
            await asyncio.Event().wait()  # a model that never answers again
            yield "data: never\n\n"
        finally:
            closed.append(True)

    sent = run(lines(), disconnect_after=1)
    assert [m["body"] for m in sent if m["type"] == "http.response.body"] == [b"data: 1\n\n"]
    assert closed == [True]

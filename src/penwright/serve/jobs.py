"""An HTTP call's requests on an engine: submitted together, their text handed from the engine's thread to
the event loop.

The engine's thread calls each request's ``emit`` with a piece of text; ``Job`` appends it to a deque and
wakes the event loop when the loop is listening for one (not while it pauses between chunks: then only a
choice's end wakes it), at most once until the loop has taken what is there. ``batches()`` then hands over
everything waiting, no more often than ``serve.stream_interval`` (the first piece at once); ``wait()`` runs
the job to its end (non-streamed answers). A full queue is a 429, an engine gone silent a 504.
"""

from __future__ import annotations

import asyncio
import collections
import time

from penwright.core.schema import Serve
from penwright.inference.engine import Engine, Request
from penwright.serve.deps import ApiError


class Job:
    """The requests of one HTTP call on one engine (``model``: its name, for the metrics)."""

    def __init__(self, engine: Engine, requests: list[Request], settings: Serve, metrics, model: str):
        self.engine, self.requests, self.settings = engine, requests, settings
        self.metrics, self.model = metrics, model
        self.loop = asyncio.get_running_loop()
        self.pieces: collections.deque = collections.deque()
        self.ready = asyncio.Event()
        self.ended = asyncio.Event()  # a choice ended: a pause between chunks stops short for it
        self.endings = self.endings_taken = 0  # choices ended on the engine's thread / taken by batches()
        self.scheduled = False
        self.listening = True  # batches() waits for the next piece (False while it pauses between chunks)
        for k, r in enumerate(requests):
            r.emit = self._emitter(k)

    def _emitter(self, k: int):
        def emit(text: str, reason: str | None) -> None:  # on the engine's thread
            if reason is not None:
                self.metrics.ended(self.model, self.requests[k])
            self.pieces.append((k, text, reason))
            if reason is not None:
                self.endings += 1
            # a wake costs the engine's thread a syscall and the event loop a turn under the GIL: none while the
            # loop pauses between chunks, for pieces it takes when the pause ends anyway
            if (self.listening or reason is not None) and not self.scheduled:
                self.scheduled = True
                self.loop.call_soon_threadsafe(self._wake)

        return emit

    def _wake(self) -> None:
        self.scheduled = False
        self.ready.set()
        if self.endings > self.endings_taken:
            self.ended.set()

    def start(self) -> None:
        if self.engine.waiting.qsize() + len(self.requests) > self.settings.queue_size:
            raise ApiError(
                429,
                f"the server is busy: {self.engine.waiting.qsize()} requests are waiting "
                f"(serve.queue_size={self.settings.queue_size}); retry shortly",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        deadline = time.monotonic() + self.settings.request_timeout
        for r in self.requests:
            r.deadline = deadline
            self.engine.submit(r)
            self.metrics.submitted(self.model, r)

    def _drain(self) -> list:
        pieces = []
        while self.pieces:
            pieces.append(self.pieces.popleft())
        return pieces

    async def batches(self):
        """Lists of (choice, text, finish_reason) in the order the engine sent them, at least one each. If the
        engine goes silent past the request's timeout (plus a grace period), the unfinished choices end here
        with ``timeout``: no request waits forever, whatever happens on the engine's thread."""
        left, last = len(self.requests), None
        deadline = time.monotonic() + self.settings.request_timeout + 5.0
        while left:
            self.listening = True  # (set before the deque is read: a piece appended after it wakes the loop)
            try:
                if not self.pieces:
                    await asyncio.wait_for(self.ready.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.cancel()
                yield [(k, "", "timeout") for k, r in enumerate(self.requests) if r.finish_reason is None] or [
                    (0, "", "timeout")
                ]
                return
            self.listening = False
            self.ready.clear()
            pieces = self._drain()
            ending = any(reason is not None for _, _, reason in pieces)
            if pieces and last is not None and self.settings.stream_interval > 0 and not ending:
                pause = self.settings.stream_interval - (time.monotonic() - last)  # a last piece goes at once
                if pause > 0 and self.endings == self.endings_taken:
                    self.ended.clear()
                    try:  # (and a choice that ends meanwhile ends its pause: its last piece goes at once)
                        await asyncio.wait_for(self.ended.wait(), pause)
                    except TimeoutError:
                        pass
                pieces += self._drain()
            if not pieces:
                continue
            last = time.monotonic()
            done = sum(reason is not None for _, _, reason in pieces)
            left -= done
            self.endings_taken += done
            yield pieces

    async def wait(self) -> None:
        """Run the job to its end (a non-streamed answer: the engine hands over each choice's text once)."""
        for r in self.requests:
            r.stream = False
        self.start()
        try:
            async for pieces in self.batches():
                reason = next((r for _, _, r in pieces if r in ("timeout", "error")), None)
                if reason is not None:
                    kind = "timeout" if reason == "timeout" else "server_error"
                    raise ApiError(504 if reason == "timeout" else 500, self.message(reason), kind=kind)
        finally:
            self.cancel()

    def message(self, reason: str) -> str:
        if reason == "timeout":
            return (
                f"the request did not finish within {self.settings.request_timeout:g} s "
                f"(serve.request_timeout); ask for fewer tokens or retry"
            )
        return "the engine failed on this request; see the server's log"

    def cancel(self) -> None:
        for r in self.requests:
            if r.finish_reason is None:
                r.cancel()

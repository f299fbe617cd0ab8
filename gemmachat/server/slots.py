"""The slots and the jobs that wait for them: a FIFO queue that hands each free engine sequence to
the request that can reuse most of its cache, and what one request's generation carries."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from gemmachat.engine import Sequence, Stats, TokenLogprob, common_prefix
from gemmachat.settings import Sampling


class ServerClosing(Exception):
    pass


class ClientGone(Exception):
    pass


def _reusable(cached: list[int], prompt: list[int]) -> int:
    """How much of `prompt` a slot holding `cached` saves, when that is most of it (a client going
    on with its conversation); else 0, so that the emptiest slot is taken and the others keep their
    caches for their own clients."""
    common = common_prefix(cached, prompt)
    return common if common * 2 >= len(prompt) else 0


class SlotQueue:
    """At most one job per sequence; the others wait in arrival order (runs on the event loop)."""

    def __init__(self, sequences: Iterable[Sequence]) -> None:
        self._free: list[Sequence] = list(sequences)
        self.total = len(self._free)
        self._waiters: deque[asyncio.Future[Sequence]] = deque()
        self._closed = False

    @property
    def idle(self) -> int:
        return len(self._free)

    @property
    def waiting(self) -> int:
        return sum(not waiter.done() for waiter in self._waiters)

    async def acquire(self, prompt: list[int]) -> Sequence:
        if self._closed:
            raise ServerClosing()
        if self._free and not self._waiters:
            # Else the lowest id: llama.cpp batches consecutive sequence ids together.
            best = max(self._free, key=lambda s: (_reusable(s.tokens, prompt), -s.seq_id))
            self._free.remove(best)
            return best
        waiter: asyncio.Future[Sequence] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())  # handed a slot just as we gave up: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self, sequence: Sequence) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(sequence)
                return
        self._free.append(sequence)

    def close(self) -> None:
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ServerClosing())


@dataclass(eq=False)
class Job:
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...]
    cache_prompt: bool = True
    ignore_eos: bool = False
    stream: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    thread: threading.Thread | None = None
    watcher: asyncio.Task[None] | None = None
    seq_id: int | None = None
    waited: float = 0.0
    stats: Stats | None = None  # the running generation's, once it has started
    top_logprobs: int | None = None  # None: no logprobs asked for
    logprobs: list[TokenLogprob] = field(default_factory=list)  # what collect() gathered

    def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None

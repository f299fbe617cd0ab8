"""The OpenAI-compatible HTTP server: `--server`, and the server beside the chat.

FastAPI on uvicorn, with sse-starlette for streams. The model is shared: each request runs on one
of the engine sequences the server was given (a "slot"), in a worker thread, because generation is
synchronous llama.cpp work; the engine decodes the running slots together, one batch per token.
Requests wait for a slot in FIFO order; a free slot goes to the request whose prompt shares the
longest prefix with what it holds, so a client that continues its conversation reuses its KV
cache. A client that goes away cancels its generation at the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Iterable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message as AsgiMessage, Receive, Scope, Send

from gemmachat import __version__, fatal, openai_api as api, tools
from gemmachat.engine import (Engine, EngineClosed, TokenLogprob, common_prefix, default_reply_limit, Sequence, Stats,
                              load_engine, renderer_for)
from gemmachat.errors import PromptTooLong, UserError, escaped, one_line, report
from gemmachat.listen import ServerUnavailable, bind_socket, page_url, url_of
from gemmachat.server import (conversations_routes, embeddings_routes, ollama_routes, operations_routes,
                              page_routes)
from gemmachat.settings import LLAMA_DEFAULT_SEED, Sampling, Settings
from gemmachat.templates import Message, Segment, load_template, to_tokens

DEFAULT_MAX_BODY = 10 * 1024 * 1024
# The longest URL path (with its query) an access log line shows.
PATH_LOG_LIMIT = 1000
SHUTDOWN_SECONDS = 3.0  # how long in-flight work gets to wind down once cancelled
LogFn = Callable[[str], None]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorResponse, "description": text}
    for status, text in ((400, "Invalid request"), (401, "Missing or wrong API key"),
                         (413, "Request body too large"), (503, "Busy or shutting down"))
}


class ServerClosing(Exception):
    pass


class ClientGone(Exception):
    pass


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _reusable(cached: list[int], prompt: list[int]) -> int:
    """How much of `prompt` a slot holding `cached` saves, when that is most of it (a client going
    on with its conversation); else 0, so that the emptiest slot is taken and the others keep their
    caches for their own clients."""
    common = common_prefix(cached, prompt)
    return common if common * 2 >= len(prompt) else 0


# -- the fair queue --------------------------------------------------------------------------------


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


# -- the server's state and its work ---------------------------------------------------------------


class ServerCore:
    """What the endpoints share: the engine, the slots, the jobs in flight, the log."""

    def __init__(self, engine: Engine, settings: Settings, seq_ids: list[int], log: LogFn | None = None,
                 max_body: int | None = None) -> None:
        if not seq_ids:
            raise ValueError("the server needs at least one sequence")
        self.engine = engine
        self.settings = settings
        self._sink: LogFn = log or _stderr
        self.verbose = settings.verbose
        self.api_key = settings.api_key
        self.max_body = max_body if max_body is not None else getattr(settings, "max_body_size", DEFAULT_MAX_BODY)
        self.sequences = [engine.new_sequence(seq_id) for seq_id in seq_ids]
        self.slots = SlotQueue(self.sequences)
        self.render = renderer_for(engine, settings, load_template(settings.template))
        self.model_id = engine.name
        try:
            self.created = int(engine.path.stat().st_mtime)
        except OSError:
            self.created = int(time.time())
        self.n_vocab = engine.n_vocab
        # For a request without max_tokens: -n, else the chat's cap for a base model.
        self.default_max_tokens = default_reply_limit(engine, settings.n_predict)
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # guards _busy and _jobs, which worker threads touch
        self._busy: set[int] = set()
        self._jobs: set[Job] = set()
        self.metrics = operations_routes.Metrics()
        self.last_jobs: dict[int, Job] = {}  # each slot's latest job, for /slots

    def log(self, line: str) -> None:
        """Every line the server logs goes out here, escaped: what a client sent (a URL path with
        %0A or %1b, an error quoting a field) can neither forge a log line nor reach the terminal."""
        self._sink(escaped(line))

    # -- requests to prompts --

    def chat_prompt(self, body: api.ChatCompletionRequest) -> list[int]:
        messages: list[tuple[str, str]] = []
        called: dict[str, str] = {}  # tool call id -> function name, for the tool messages answering them
        for index, message in enumerate(body.messages):
            if message.role not in ("system", "developer", "user", "assistant", "tool"):
                raise api.ApiError(400, f"unknown role {message.role!r} in messages[{index}] "
                                   "(use system, user, assistant or tool)", code="invalid_value", param="messages")
            if message.content is None and not (message.role == "assistant"):
                raise api.ApiError(400, f"messages[{index}] has no content", code="missing_required_parameter",
                                   param="messages")
            for call in message.tool_calls or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    called[str(call.get("id"))] = str(call["function"].get("name", ""))
            try:
                role, text = tools.as_text(message.role, message.text(), message.tool_calls,
                                           message.name or called.get(str(message.tool_call_id)))
            except tools.ToolsRefused as refused:
                raise api.ApiError(400, f"messages[{index}]: {refused}", code="invalid_value",
                                   param="messages") from None
            messages.append(("system" if role == "developer" else role, text))
        # Leading system messages are the system prompt (the template decides where it goes).
        system_parts = []
        while messages and messages[0][0] == "system":
            system_parts.append(messages.pop(0)[1])
        if not messages:
            raise api.ApiError(400, "messages need at least one user or assistant message",
                               code="invalid_value", param="messages")
        if body.tool_plan is not None:
            system_parts.append(body.tool_plan.system)
        system = "\n\n".join(system_parts) if system_parts else None
        try:
            segments = self.render(system, [Message(role, text) for role, text in messages], True)
        except UserError as error:
            raise api.ApiError(400, str(error), code="invalid_value", param="messages") from None
        return to_tokens(self.engine, segments, special=self.settings.special, limit=self.engine.n_ctx_seq)

    def completion_prompt(self, body: api.CompletionRequest) -> tuple[list[int], str]:
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            tokens = [int(token) for token in prompt]
            self.check_tokens(tokens, "prompt")
            return tokens, self.detokenize(tokens) if body.echo else ""
        text = prompt if isinstance(prompt, str) else str(prompt[0])
        return to_tokens(self.engine, [Segment(text, trusted=False)], special=self.settings.special,
                         limit=self.engine.n_ctx_seq), text

    def check_tokens(self, tokens: list[int], param: str) -> None:
        if len(tokens) > self.engine.n_ctx_seq:
            raise api.ApiError(400, f"{len(tokens)} tokens are more than the {self.engine.n_ctx_seq} the context "
                               "holds", code="context_length_exceeded", param=param)
        bad = next((token for token in tokens if not 0 <= token < self.n_vocab), None)
        if bad is not None:
            raise api.ApiError(400, f"token {bad} is not in the vocabulary (0..{self.n_vocab - 1})",
                               code="invalid_value", param=param)

    def check_max_tokens(self, max_tokens: int | None) -> int:
        limit = self.engine.n_ctx_seq
        if max_tokens is not None and max_tokens > limit:
            raise api.ApiError(400, f"max_tokens is too large: {max_tokens}; the context holds {limit} "
                               "tokens, prompt and reply together", code="invalid_value", param="max_tokens")
        return -1 if max_tokens is None else max_tokens

    def check_fits(self, prompt: list[int], param: str) -> None:
        limit = self.engine.n_ctx_seq
        if len(prompt) >= limit:
            raise api.ApiError(400, f"the prompt is {len(prompt)} tokens, but the context holds {limit} "
                               "(prompt and reply together)", code="context_length_exceeded", param=param)

    def sampling_for(self, body: api._Generation) -> Sampling:
        changes: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(body, name)
            if value is not None:
                changes[name] = value
        if body.seed is not None:
            changes["seed"] = body.seed % 2**32 if body.seed >= 0 else LLAMA_DEFAULT_SEED
        if body.logit_bias:
            biases = []
            for key, bias in body.logit_bias.items():
                try:
                    token = int(key)
                except ValueError:
                    raise api.ApiError(400, f"logit_bias keys are token ids, not {key!r}", code="invalid_value",
                                       param="logit_bias") from None
                self.check_tokens([token], "logit_bias")
                if not -100 <= bias <= 100:
                    raise api.ApiError(400, f"logit_bias values lie in -100..100, not {bias}",
                                       code="invalid_value", param="logit_bias")
                biases.append((token, float(bias)))
            changes["logit_bias"] = tuple(biases)
        grammar = body.output_grammar()
        if grammar is not None:
            changes["grammar"] = grammar
        return replace(self.settings.sampling, **changes)

    def detokenize(self, tokens: list[int]) -> str:
        # As llama.cpp's /detokenize: control tokens are spelled out, bytes joined before decoding.
        data = b"".join(self.engine.piece(token) or self.engine.token_text(token).encode() for token in tokens)
        return data.decode("utf-8", errors="replace")

    def token_piece(self, token: int) -> str | list[int]:
        data = self.engine.piece(token) or self.engine.token_text(token).encode()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return list(data)

    # -- running jobs --

    async def begin(self, request: Request, job: Job) -> tuple[str, Any]:
        """Queue the job, run it on a free slot, and return its first event.

        The prompt is evaluated before this returns, so a failure there is still an HTTP error.
        Raises ClientGone if the client leaves while waiting.
        """
        if self.closing:
            raise _shutting_down()
        job.watcher = asyncio.create_task(self._watch(request, job))
        acquire = asyncio.create_task(self.slots.acquire(job.prompt))
        queued = time.perf_counter()
        try:
            await asyncio.wait({acquire, job.watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            acquire.cancel()
            job.stop_watching()
            raise
        if not acquire.done():
            acquire.cancel()
            await asyncio.gather(acquire, return_exceptions=True)
            job.stop_watching()
            raise ClientGone()
        try:
            sequence = acquire.result()
        except ServerClosing:
            job.stop_watching()
            raise _shutting_down() from None
        job.waited = time.perf_counter() - queued
        job.seq_id = sequence.seq_id
        with self._lock:
            self._jobs.add(job)
            self._busy.add(sequence.seq_id)
            self.last_jobs[sequence.seq_id] = job
        if self.closing:
            job.cancel.set()
        loop = asyncio.get_running_loop()
        job.thread = threading.Thread(target=self._work, args=(job, sequence, loop), daemon=True,
                                      name=f"gemma-chat slot {sequence.seq_id}")
        job.thread.start()
        first = await job.events.get()
        if first[0] == "error":
            job.stop_watching()
            raise first[1]
        return first

    async def _watch(self, request: Request, job: Job) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        job.cancel.set()

    def _work(self, job: Job, sequence: Sequence, loop: asyncio.AbstractEventLoop) -> None:
        def put(event: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(job.events.put_nowait, event)
            except RuntimeError:  # the loop is gone: the server stopped
                pass

        final: tuple[str, Any]
        try:
            final = self._generate(job, sequence, put)
        except PromptTooLong as error:
            final = ("error", api.ApiError(400, str(error), code="context_length_exceeded"))
        except EngineClosed:
            final = ("error", _shutting_down())
        except UserError as error:
            final = ("error", api.ApiError(400, str(error)))
        except BaseException as error:  # noqa: BLE001 - reported to the client, and logged
            self.log(f"gemma-chat: generation failed on slot {sequence.seq_id}: {type(error).__name__}: {error}")
            final = ("error", api.ApiError(500, f"generation failed: {error}"))
        # The slot is free before the client hears the end, so that /health and the next request
        # already see it free.
        if final[0] == "done":
            self.metrics.record(final[1])
        with self._lock:
            self._busy.discard(sequence.seq_id)
            self._jobs.discard(job)
        try:
            loop.call_soon_threadsafe(self.slots.release, sequence)
        except RuntimeError:
            pass
        put(final)

    def _generate(self, job: Job, sequence: Sequence, put: Callable[[tuple[str, Any]], None]) -> tuple[str, Any]:
        if job.cancel.is_set():
            return ("done", Stats(prompt_tokens=len(job.prompt), finish_reason="cancelled"))
        if not job.cache_prompt:
            self.engine.new_sequence(sequence.seq_id)
        self._make_room(sequence, job)
        generation = self.engine.generate(sequence, job.prompt, job.sampling, max_tokens=job.max_tokens,
                                          stop=job.stop, ignore_eos=job.ignore_eos, cancelled=job.cancel.is_set,
                                          top_logprobs=job.top_logprobs)
        job.stats = generation.stats
        pieces = iter(generation)
        # A reply nobody streams goes to the event loop in one piece: a wake-up of the loop per
        # token and client costs the decode CPU time on a small machine.
        held: list[str] = []
        sent_logprobs = 0

        def put_logprobs() -> None:
            # ("logprobs", entries) goes just before the text of the tokens they are for.
            nonlocal sent_logprobs
            if len(generation.logprobs) > sent_logprobs:
                put(("logprobs", generation.logprobs[sent_logprobs:]))
                sent_logprobs = len(generation.logprobs)

        try:
            for piece in pieces:
                if job.stream:
                    put_logprobs()
                    put(("text", piece))
                else:
                    held.append(piece)
                if job.cancel.is_set():
                    generation.stats.finish_reason = "cancelled"
                    break
        except PromptTooLong:
            # The context is shared by every slot (and the chat): it filled up.
            if generation.stats.generated_tokens == 0:
                return ("error", api.ApiError(503, "the context is full with other requests; try again",
                                              code="context_full"))
            generation.stats.finish_reason = "length"
        finally:
            generation.pieces.close()  # type: ignore[attr-defined]
            put_logprobs()
            if held:
                put(("text", "".join(held)))
        return ("done", generation.stats)

    def _make_room(self, sequence: Sequence, job: Job) -> None:
        """Forget idle slots' caches when this job would not fit beside them.

        With one KV pool for all sequences, tokens an idle slot keeps for prefix reuse take room a
        running request may need. (With the context split, each slot has its own.)
        """
        if not self.engine.options.shared_kv:
            return
        capacity = self.engine.n_ctx
        reply = job.max_tokens if job.max_tokens > 0 else capacity // 4
        with self._lock:
            others = [s for s in self.sequences if s is not sequence]
            used = sum(len(s.tokens) for s in others)
            needed = min(capacity, len(job.prompt) + reply)
            idle = sorted((s for s in others if s.seq_id not in self._busy), key=lambda s: -len(s.tokens))
            for other in idle:
                if used + needed <= capacity:
                    break
                used -= len(other.tokens)
                self.engine.new_sequence(other.seq_id)

    async def chat_job(self, body: api.ChatCompletionRequest) -> Job:
        """The job a chat completion request asks for, its prompt rendered and checked."""
        body.check()
        max_tokens = self.check_max_tokens(body.token_limit())
        if max_tokens < 0:
            max_tokens = self.default_max_tokens
        job = Job([], self.sampling_for(body), max_tokens, body.stops(), body.cache_prompt, body.ignore_eos,
                  top_logprobs=body.logprobs_wanted())
        job.prompt = await run_in_threadpool(self.chat_prompt, body)
        self.check_fits(job.prompt, "messages")
        return job

    async def completion_job(self, body: api.CompletionRequest) -> tuple[Job, str]:
        """The job a completion request asks for, and the prompt's text for `echo`."""
        body.check()
        max_tokens = self.check_max_tokens(body.max_tokens)
        if "max_tokens" not in body.model_fields_set and self.settings.n_predict > 0:
            max_tokens = self.settings.n_predict  # -n on the command line, else OpenAI's 16
        elif max_tokens < 0:  # "max_tokens": null
            max_tokens = self.default_max_tokens
        job = Job([], self.sampling_for(body), max_tokens, body.stops(), body.cache_prompt, body.ignore_eos,
                  top_logprobs=body.logprobs_wanted())
        job.prompt, echoed = await run_in_threadpool(self.completion_prompt, body)
        self.check_fits(job.prompt, "prompt")
        return job, echoed

    async def collect(self, job: Job, first: tuple[str, Any]) -> tuple[str, Stats]:
        parts: list[str] = []
        event = first
        try:
            while True:
                kind, value = event
                if kind == "text":
                    parts.append(value)
                elif kind == "logprobs":
                    job.logprobs += value
                elif kind == "done":
                    return "".join(parts), value
                else:
                    raise value
                event = await job.events.get()
        finally:
            job.stop_watching()
            job.cancel.set()  # a no-op once done; stops the work if this handler is cancelled

    async def stream(self, request: Request, job: Job, first: tuple[str, Any],
                     chunk: Callable[[str | None, str | None, list[TokenLogprob]], dict[str, Any]],
                     include_usage: bool) -> AsyncIterator[str]:
        """SSE data lines: chunk(text, None, logprobs) per piece, chunk(None, finish_reason, ...) at
        the end, with the logprobs of the tokens since the last chunk."""
        logprobs: list[TokenLogprob] = []
        async for kind, value in self.events(request, job, first):
            if kind == "logprobs":
                logprobs += value
            elif kind == "text":
                yield _json(chunk(value, None, logprobs))
                logprobs = []
            elif kind == "done":
                yield _json(chunk(None, finish_reason(value), logprobs))
                if include_usage:
                    last = chunk(None, None, [])
                    last["choices"] = []
                    last["usage"] = api.usage(value)
                    yield _json(last)
                yield "[DONE]"
            else:
                yield _json(value.body())

    async def events(self, request: Request, job: Job, first: tuple[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        """A streamed job's events for a response to format: ("text", piece)..., each after the
        ("logprobs", entries) of its tokens if the job asked for them, then ("done", stats) or
        ("error", ApiError). Noted for the access log; a client that hangs up cancels it."""
        event = first
        finished = False
        try:
            while True:
                kind, value = event
                if kind in ("text", "logprobs"):
                    yield event
                elif kind == "done":
                    finished = True
                    self.note(request, job, value)
                    yield event
                    return
                else:
                    finished = True
                    error = value if isinstance(value, api.ApiError) else api.ApiError(500, str(value))
                    request.scope["gemma.error"] = error.message
                    yield "error", error
                    return
                event = await job.events.get()
        finally:
            job.cancel.set()  # the client hung up (or we are done): stop at the next token
            if not finished:
                self.note(request, job, job.stats or Stats(prompt_tokens=len(job.prompt)), "cancelled")

    def note(self, request: Request, job: Job, stats: Stats, outcome: str | None = None) -> None:
        """Details for the access log line."""
        if outcome is None:
            outcome = "cancelled" if stats.finish_reason == "cancelled" else finish_reason(stats)
        detail = f"prompt {stats.prompt_tokens} tokens, generated {stats.generated_tokens}, {outcome}"
        if self.verbose:
            detail += (f"; slot {job.seq_id}, waited {job.waited:.2f}s, reused {stats.reused_tokens}, "
                       f"{stats.prompt_tokens_per_second:.0f} prompt tokens/s, "
                       f"{stats.generation_tokens_per_second:.1f} tokens/s")
        request.scope["gemma.log"] = detail

    # -- lifecycle --

    def shutdown(self) -> None:
        """Stop taking work and cancel what runs (callable from any thread, and from signals)."""
        self.closing = True
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel.set()
        loop = self.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.slots.close)
            except RuntimeError:
                pass

    def join_workers(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the worker threads to end (closing the engine then waits
        for any call into llama.cpp they are still making)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                threads = [job.thread for job in self._jobs if job.thread is not None]
            if not threads:
                return
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    def busy_slots(self) -> set[int]:
        with self._lock:
            return set(self._busy)

    def health(self) -> dict[str, Any]:
        busy = len(self.busy_slots())
        return {"status": "shutting down" if self.closing else "ok", "slots_idle": self.slots.total - busy,
                "slots_processing": busy, "requests_waiting": self.slots.waiting}


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def finish_reason(stats: Stats) -> str:
    return "length" if stats.finish_reason == "length" else "stop"


# -- the ASGI layers -------------------------------------------------------------------------------


class Gatekeeper:
    """Outermost layer: the access log line, the API key, and the request body limit."""

    def __init__(self, app: ASGIApp, core: ServerCore) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_and_note)
        finally:
            self._log(scope, status, time.perf_counter() - started)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        core = self.core
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if core.api_key and scope["path"] != "/health" and not page_routes.is_page(scope["path"]):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), core.api_key.encode()):
                await _drain(receive, 1 << 20)
                message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "invalid API key"
                await _error(send, scope, api.ApiError(401, message, code="invalid_api_key"),
                             {"www-authenticate": "Bearer"})
                return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _error(send, scope, api.ApiError(400, "invalid Content-Length"))
                return
            if int(length) > core.max_body:
                await _drain(receive, 4 * core.max_body)
                await _error(send, scope, _too_large(core.max_body))
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            # The body is JSON whatever the client calls it, as with llama.cpp: `curl -d` says
            # application/x-www-form-urlencoded, and FastAPI would not parse that.
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                scope["headers"] = [(name, value) for name, value in scope["headers"]
                                    if name.lower() != b"content-type"] + [(b"content-type", b"application/json")]
            body = bytearray()
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > core.max_body:
                    if more:
                        await _drain(receive, 4 * core.max_body)
                    await _error(send, scope, _too_large(core.max_body))
                    return
            # Every string a client sends is text we can answer with: no lone surrogates.
            receive = _replay(api.replace_lone_surrogates(bytes(body)), receive)
        await self.app(scope, receive, send)

    def _log(self, scope: Scope, status: int, seconds: float) -> None:
        client = scope.get("client")
        who = client[0] if client else "-"
        query = scope.get("query_string", b"")
        path = one_line(scope["path"] + ("?" + query.decode("latin-1") if query else ""), PATH_LOG_LIMIT)
        line = f'{who} "{scope["method"]} {path}" {status or 499} {seconds:.2f}s'
        detail = scope.get("gemma.log")
        if detail:
            line += f" {detail}"
        error = scope.get("gemma.error")
        if error and self.core.verbose:
            line += f" ({error})"
        try:
            self.core.log(line)
        except Exception:  # noqa: BLE001 - a broken log sink must not break the server
            pass


def _shutting_down() -> api.ApiError:
    return api.ApiError(503, "the server is shutting down", code="shutting_down")


def _too_large(limit: int) -> api.ApiError:
    return api.ApiError(413, f"the request body is larger than the limit of {limit} bytes",
                        code="request_too_large")


async def _drain(receive: Receive, limit: int) -> None:
    """Read (and drop) the rest of a request body, so the client sees our answer, not a reset."""
    total = 0
    while total <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> AsgiMessage:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replay


async def _error(send: Send, scope: Scope, error: api.ApiError, headers: dict[str, str] | None = None) -> None:
    scope["gemma.error"] = error.message
    response = JSONResponse(error.body(), status_code=error.status, headers=headers)

    async def no_receive() -> AsgiMessage:
        return {"type": "http.disconnect"}

    await response(scope, no_receive, send)


def create_app(core: ServerCore) -> FastAPI:
    app = FastAPI(
        title="gemma-chat",
        version=__version__,
        description="An OpenAI-compatible API for a local Gemma model on llama.cpp.",
        redoc_url=None,
    )
    app.state.core = core
    settings = core.settings

    def error_response(request: Request, error: api.ApiError) -> JSONResponse:
        request.scope["gemma.error"] = error.message
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(api.ApiError)
    async def on_api_error(request: Request, error: api.ApiError) -> JSONResponse:
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, api.validation_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
            code = "not_found"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            code = "method_not_allowed"
        else:
            message, code = str(error.detail), None
        response = error_response(request, api.ApiError(error.status_code, message, code=code))
        for name, value in (error.headers or {}).items():
            response.headers[name] = value
        return response

    # Text over the context, found while tokenizing it (a prompt, messages, /tokenize).
    @app.exception_handler(PromptTooLong)
    async def on_too_long(request: Request, error: PromptTooLong) -> JSONResponse:
        return error_response(request, api.ApiError(400, str(error), code="context_length_exceeded"))

    @app.exception_handler(EngineClosed)
    async def on_closed(request: Request, error: EngineClosed) -> JSONResponse:
        return error_response(request, _shutting_down())

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, error: ClientGone) -> Response:
        request.scope["gemma.log"] = "client went away while waiting"
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, error: Exception) -> JSONResponse:
        core.log(f"gemma-chat: {request.method} {request.url.path} failed: {type(error).__name__}: {error}")
        return error_response(request, api.ApiError(500, f"internal error: {type(error).__name__}"))

    @app.post("/v1/chat/completions", response_model=api.ChatCompletion, responses=_ERRORS,
              summary="Chat completion (streamed as server-sent events with stream: true)")
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Any:
        job = await core.chat_job(body)
        if body.tool_plan is not None:
            return await tool_answer(request, body, body.tool_plan, job)
        said_role = False

        def delta(text: str | None, finish: str | None) -> dict[str, Any]:
            nonlocal said_role
            change: dict[str, Any] = {}
            if not said_role:
                change["role"] = "assistant"
                said_role = True
            if text is not None:
                change["content"] = text
            elif finish is None:
                change = {}
            return {"delta": change}

        return await answer(request, body, job, "chatcmpl", ("chat.completion", "chat.completion.chunk"), delta,
                            lambda text: {"message": {"role": "assistant", "content": text}},
                            lambda entries: api.chat_logprobs(entries, core.engine.piece))

    @app.post("/v1/completions", response_model=api.Completion, responses=_ERRORS,
              summary="Text completion of a prompt (streamed with stream: true)")
    async def completions(body: api.CompletionRequest, request: Request) -> Any:
        job, echoed = await core.completion_job(body)
        echo = echoed if body.echo else ""
        pending_echo = echo

        def delta(text: str | None, finish: str | None) -> dict[str, Any]:
            nonlocal pending_echo
            piece = {"text": pending_echo + (text or "")}
            pending_echo = ""
            return piece

        offset = len(echo)

        def logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
            nonlocal offset
            shaped = api.completion_logprobs(entries, core.engine.piece, offset)
            offset += sum(len(token) for token in shaped["tokens"])
            return shaped

        return await answer(request, body, job, "cmpl", ("text_completion", "text_completion"), delta,
                            lambda text: {"text": echo + text}, logprobs)

    def answer_head(id_prefix: str) -> dict[str, Any]:
        return {"id": api.new_id(id_prefix), "created": api.now(), "model": core.model_id,
                "system_fingerprint": f"gemma-chat-{__version__}"}

    async def tool_answer(request: Request, body: api.ChatCompletionRequest, plan: tools.ToolPlan, job: Job) -> Any:
        """A reply that may be tool calls: known only once its JSON is whole, so streamed (if asked)
        as OpenAI streams calls, in one chunk after the generation."""
        job.stream = False
        first = await core.begin(request, job)
        text, stats = await core.collect(job, first)
        core.note(request, job, stats)
        content, calls = plan.parse(text)
        finish = "tool_calls" if calls else finish_reason(stats)
        head = answer_head("chatcmpl")
        usage = api.usage(stats)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        if not body.stream:
            return {**head, "object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]}
        if calls:
            message["tool_calls"] = [{"index": index, **call} for index, call in enumerate(calls)]
        chunks = [{"index": 0, "delta": message, "logprobs": None, "finish_reason": None},
                  {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]
        lines = [_json({**head, "object": "chat.completion.chunk", "choices": [chunk]}) for chunk in chunks]
        if body.stream_options and body.stream_options.include_usage:
            lines.append(_json({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}))

        async def events() -> AsyncIterator[str]:
            for line in [*lines, "[DONE]"]:
                yield line

        return EventSourceResponse(events(), sep="\n")

    async def answer(request: Request, body: api.CompletionRequest | api.ChatCompletionRequest, job: Job,
                     id_prefix: str, kinds: tuple[str, str], delta: Callable[[str | None, str | None], dict[str, Any]],
                     whole: Callable[[str], dict[str, Any]],
                     shape_logprobs: Callable[[list[TokenLogprob]], dict[str, Any]]) -> Any:
        """Run the job and answer in OpenAI's shape: one object of kinds[0] (whole() gives the
        choice's content) or, streaming, server-sent chunks of kinds[1] (delta() gives each one's);
        shape_logprobs() gives a choice's logprobs when the request asked for them."""

        def logprobs(entries: list[TokenLogprob]) -> dict[str, Any] | None:
            return None if job.top_logprobs is None else shape_logprobs(entries)

        job.stream = bool(body.stream)
        first = await core.begin(request, job)
        head = answer_head(id_prefix)
        if body.stream:
            job.stop_watching()
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(text: str | None, finish: str | None, entries: list[TokenLogprob]) -> dict[str, Any]:
                event = {**head, "object": kinds[1], "choices": [
                    {"index": 0, **delta(text, finish), "logprobs": logprobs(entries), "finish_reason": finish}]}
                if include_usage:
                    event["usage"] = None
                return event

            return EventSourceResponse(core.stream(request, job, first, chunk, include_usage), sep="\n", ping=15)
        text, stats = await core.collect(job, first)
        core.note(request, job, stats)
        return {**head, "object": kinds[0],
                "choices": [{"index": 0, **whole(text), "finish_reason": finish_reason(stats),
                             "logprobs": logprobs(job.logprobs)}],
                "usage": api.usage(stats)}

    def model_card() -> dict[str, Any]:
        return {"id": core.model_id, "object": "model", "created": core.created, "owned_by": "gemma-chat"}

    @app.get("/v1/models", response_model=api.ModelList, responses=_ERRORS, summary="The loaded model")
    async def models() -> Any:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=api.ModelCard, responses=_ERRORS,
             summary="The loaded model, by id")
    async def model(model_id: str) -> Any:
        if model_id != core.model_id:
            raise api.ApiError(404, f"the model {model_id!r} does not exist (this server has {core.model_id!r})",
                               code="model_not_found", param="model")
        return model_card()

    @app.get("/health", response_model=api.Health, summary="Liveness and slot use (no API key needed)")
    async def health() -> Any:
        return core.health()

    @app.post("/tokenize", response_model=api.TokenizeResponse, responses=_ERRORS,
              summary="Text to tokens (llama.cpp's shape)")
    async def tokenize(body: api.TokenizeRequest) -> Any:
        def work() -> dict[str, Any]:
            tokens = core.engine.tokenize(body.content, special=body.parse_special, add_bos=body.add_special,
                                          limit=core.engine.n_ctx_seq)
            if body.with_pieces:
                return {"tokens": [{"id": token, "piece": core.token_piece(token)} for token in tokens]}
            return {"tokens": tokens}

        return await run_in_threadpool(work)

    @app.post("/detokenize", response_model=api.DetokenizeResponse, responses=_ERRORS,
              summary="Tokens to text (llama.cpp's shape)")
    async def detokenize(body: api.DetokenizeRequest) -> Any:
        core.check_tokens(body.tokens, "tokens")
        return {"content": await run_in_threadpool(core.detokenize, body.tokens)}

    # llama.cpp also answers without the /v1 prefix; so do we (kept out of the schema).
    ollama_routes.add_routes(app, core)
    operations_routes.add_routes(app, core)
    embeddings_routes.add_routes(app, core)
    conversations_routes.add_routes(app, core)
    page_routes.add_routes(app, core)
    app.add_api_route("/chat/completions", chat_completions, methods=["POST"], include_in_schema=False)
    app.add_api_route("/completions", completions, methods=["POST"], include_in_schema=False)
    app.add_api_route("/models", models, methods=["GET"], include_in_schema=False)

    app.add_middleware(Gatekeeper, core=core)
    return app


class _Server(uvicorn.Server):
    # Signals are ours to handle (uvicorn's would re-raise SIGTERM after shutdown, exiting 143).
    def capture_signals(self):  # type: ignore[override]
        import contextlib

        return contextlib.nullcontext()


class _LogHandler(logging.Handler):
    def __init__(self, log: LogFn) -> None:
        super().__init__()
        self.log = log
        self.setFormatter(logging.Formatter("gemma-chat: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log(self.format(record))
        except Exception:  # noqa: BLE001
            pass


def _uvicorn(core: ServerCore) -> tuple[_Server, _LogHandler]:
    config = uvicorn.Config(
        create_app(core), log_config=None, access_log=False, lifespan="off", http="h11", ws="none",
        loop="asyncio", timeout_graceful_shutdown=int(SHUTDOWN_SECONDS), timeout_keep_alive=5,
        server_header=False, proxy_headers=False,
    )
    handler = _LogHandler(core.log)
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if core.verbose else logging.WARNING)
    logger.propagate = False
    return _Server(config), handler


async def _serve(core: ServerCore, server: _Server, sock: socket.socket) -> None:
    core.loop = asyncio.get_running_loop()
    await server.serve(sockets=[sock])


class BackgroundServer:
    """The server on a daemon thread, sharing an engine the caller owns."""

    def __init__(self, core: ServerCore, server: _Server, handler: _LogHandler, sock: socket.socket) -> None:
        self.core = core
        self.port = sock.getsockname()[1]
        self.url = url_of(sock, core.settings.host)
        self._server = server
        self._handler = handler
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="gemma-chat server", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(_serve(self.core, self._server, self._sock))
        except BaseException as error:  # noqa: BLE001 - SystemExit from uvicorn included
            self.error = error
            self.core.log(f"gemma-chat: the server stopped: {error}")

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            self.stop()
            raise ServerUnavailable(f"the server did not start{': ' + str(self.error) if self.error else ''}")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel in-flight requests and stop; the engine can be closed once this returns."""
        self.core.shutdown()
        self._server.should_exit = True
        self._thread.join(timeout)
        self.core.join_workers(SHUTDOWN_SECONDS)
        self._sock.close()
        logging.getLogger("uvicorn.error").removeHandler(self._handler)


def start_background(engine: Engine, settings: Settings, seq_ids: list[int], log: LogFn | None = None,
                     max_body: int | None = None, sock: socket.socket | None = None) -> BackgroundServer:
    """Serve the API beside the chat on `sock` (bind_socket's; it is the server's from then on),
    else on settings.host:settings.port, on sequences `seq_ids`. Returns once it is serving.

    Raises ServerUnavailable (a UserError, one line) if the port cannot be bound or the server does
    not start. Access log lines and server warnings go to `log` (default: stderr).
    """
    if sock is None:
        sock = bind_socket(settings.host, settings.port)
    try:
        core = ServerCore(engine, settings, seq_ids, log, max_body)
        server, handler = _uvicorn(core)
    except BaseException:
        sock.close()
        raise
    background = BackgroundServer(core, server, handler, sock)
    background.start()
    return background


def serve(settings: Settings, log: LogFn | None = None) -> int:
    """`--server`: serve until SIGINT or SIGTERM, then cancel in-flight work and return 0."""
    sock = bind_socket(settings.host, settings.port)  # before loading: a taken port fails fast
    try:
        engine = load_engine(settings, sequences=settings.parallel, shared_kv=False)
    except BaseException:
        sock.close()
        raise
    try:
        core = ServerCore(engine, settings, list(range(settings.parallel)), log)
        server, _ = _uvicorn(core)
    except BaseException:
        sock.close()
        engine.close()
        raise

    def on_signal(signum: int, frame: object) -> None:
        if server.should_exit:
            server.force_exit = True  # a second ctrl-c: stop waiting for anything
        server.should_exit = True
        core.shutdown()

    fatal.interrupts_to_python()  # and at once replaced by the server's graceful shutdown
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _stderr(f"gemma-chat: serving {url_of(sock, settings.host)} (model {engine.name}, "
            f"{settings.parallel} slot{'s' if settings.parallel != 1 else ''})")
    page_routes.open_browser(page_url(sock, settings.host), settings.nobrowser, settings.environ)
    try:
        asyncio.run(_serve(core, server, sock))
    finally:
        core.shutdown()
        core.join_workers(SHUTDOWN_SECONDS)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        engine.close()  # waits for calls into llama.cpp still running on other threads
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m gemmachat.server ARGS`: the same as `gemma-chat --server ARGS`."""
    from gemmachat.settings import parse_settings

    try:
        return serve(parse_settings(["--server", *(sys.argv[1:] if argv is None else argv)]))
    except UserError as error:
        return report(error)
    except KeyboardInterrupt:  # while loading, before the server handles signals
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

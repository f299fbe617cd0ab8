"""The server's state and work: ServerCore, which every route shares, turns requests into
prompts and jobs, runs each job on a slot in a worker thread, and hands its events back to the
event loop."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from gemmachat import openai_api as api, tools
from gemmachat.engine import Engine, EngineClosed, Sequence, Stats, TokenLogprob, default_reply_limit, renderer_for
from gemmachat.errors import PromptTooLong, UserError, escaped
from gemmachat.server import operations_routes
from gemmachat.server.responses import finish_reason, json_line, shutting_down
from gemmachat.server.slots import ClientGone, Job, ServerClosing, SlotQueue
from gemmachat.settings import LLAMA_DEFAULT_SEED, Sampling, Settings
from gemmachat.templates import Message, Segment, load_template, to_tokens

DEFAULT_MAX_BODY = 10 * 1024 * 1024
LogFn = Callable[[str], None]


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ServerCore:
    """What the endpoints share: the engine, the slots, the jobs in flight, the log."""

    def __init__(self, engine: Engine, settings: Settings, seq_ids: list[int], log: LogFn | None = None,
                 max_body: int | None = None) -> None:
        if not seq_ids:
            raise ValueError("the server needs at least one sequence")
        self.engine = engine
        self.settings = settings
        self._sink: LogFn = log or to_stderr
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

    def too_long(self, message: str, param: str | None = None,
                 code: str = "context_length_exceeded") -> api.ApiError:
        """The 400 for text or a reply the context cannot hold, saying where a request's context
        comes from: a client's num_ctx or model limit cannot change it."""
        engine = self.engine
        return api.ApiError(400, f"{message} (a request gets {engine.n_ctx_seq} tokens here: the server's "
                            f"context of {engine.n_ctx} over {engine.n_ctx // engine.n_ctx_seq} slots; -c and -np "
                            "set them)", code=code, param=param)

    def check_tokens(self, tokens: list[int], param: str) -> None:
        if len(tokens) > self.engine.n_ctx_seq:
            raise self.too_long(f"{len(tokens)} tokens are more than the {self.engine.n_ctx_seq} the context holds",
                                param)
        bad = next((token for token in tokens if not 0 <= token < self.n_vocab), None)
        if bad is not None:
            raise api.ApiError(400, f"token {bad} is not in the vocabulary (0..{self.n_vocab - 1})",
                               code="invalid_value", param=param)

    def check_max_tokens(self, max_tokens: int | None) -> int:
        limit = self.engine.n_ctx_seq
        if max_tokens is not None and max_tokens > limit:
            raise self.too_long(f"max_tokens is too large: {max_tokens}; the context holds {limit} tokens, "
                                "prompt and reply together", "max_tokens", code="invalid_value")
        return -1 if max_tokens is None else max_tokens

    def check_fits(self, prompt: list[int], param: str) -> None:
        limit = self.engine.n_ctx_seq
        if len(prompt) >= limit:
            raise self.too_long(f"the prompt is {len(prompt)} tokens, but the context holds {limit} "
                                "(prompt and reply together)", param)

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
            raise shutting_down()
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
            raise shutting_down() from None
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
            final = ("error", self.too_long(str(error)))
        except EngineClosed:
            final = ("error", shutting_down())
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

    async def collect(self, request: Request, job: Job, first: tuple[str, Any]) -> tuple[str, Stats]:
        """A job nobody streams, from its first event: its whole text and stats (noted for the
        access log); the logprobs it asked for gather in job.logprobs."""
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
                    self.note(request, job, value)
                    if value.finish_reason == "cancelled":
                        if await request.is_disconnected():
                            raise ClientGone()  # 499 in the access log: no answer reached anyone
                        if self.closing:
                            raise shutting_down()  # a 503, not a cut reply passed off as whole
                    return "".join(parts), value
                else:
                    raise value
                event = await job.events.get()
        finally:
            job.stop_watching()
            job.cancel.set()  # a no-op once done; stops the work if this handler is cancelled

    async def run_whole(self, request: Request, job: Job) -> tuple[str, Stats]:
        """Run the job unstreamed (a reply that is only known once whole, as tool calls are)."""
        job.stream = False
        return await self.collect(request, job, await self.begin(request, job))

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
                yield json_line(chunk(value, None, logprobs))
                logprobs = []
            elif kind == "done":
                if value.finish_reason == "cancelled" and self.closing:
                    # Cut by the server's own stop: an error, or a client would take the reply as whole.
                    yield json_line(shutting_down().body())
                    return
                yield json_line(chunk(None, finish_reason(value), logprobs))
                if include_usage:
                    last = chunk(None, None, [])
                    last["choices"] = []
                    last["usage"] = api.usage(value)
                    yield json_line(last)
                yield "[DONE]"
            else:
                yield json_line(value.body())

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

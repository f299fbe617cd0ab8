"""OpenAI's API: /v1/chat/completions (with tool calls), /v1/completions and /v1/models, each
streamed as OpenAI streams it when asked; and llama.cpp's /tokenize, /detokenize and /health."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from gemmachat import __version__, openai_api as api, tools
from gemmachat.engine import TokenLogprob
from gemmachat.server.core import ServerCore
from gemmachat.server.responses import ERROR_RESPONSES, finish_reason, json_line
from gemmachat.server.slots import Job


def add_routes(app: FastAPI, core: ServerCore) -> None:
    @app.post("/v1/chat/completions", response_model=api.ChatCompletion, responses=ERROR_RESPONSES,
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

    @app.post("/v1/completions", response_model=api.Completion, responses=ERROR_RESPONSES,
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
            shaped, offset = api.completion_logprobs(entries, core.engine.piece, offset)
            return shaped

        return await answer(request, body, job, "cmpl", ("text_completion", "text_completion"), delta,
                            lambda text: {"text": echo + text}, logprobs)

    def answer_head(id_prefix: str) -> dict[str, Any]:
        return {"id": api.new_id(id_prefix), "created": api.now(), "model": core.model_id,
                "system_fingerprint": f"gemma-chat-{__version__}"}

    async def tool_answer(request: Request, body: api.ChatCompletionRequest, plan: tools.ToolPlan, job: Job) -> Any:
        """A reply that may be tool calls: known only once its JSON is whole, so streamed (if asked)
        as OpenAI streams calls, in one chunk after the generation."""
        text, stats = await core.run_whole(request, job)
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
        lines = [json_line({**head, "object": "chat.completion.chunk", "choices": [chunk]}) for chunk in chunks]
        if body.stream_options and body.stream_options.include_usage:
            lines.append(json_line({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}))

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
        text, stats = await core.collect(request, job, first)
        return {**head, "object": kinds[0],
                "choices": [{"index": 0, **whole(text), "finish_reason": finish_reason(stats),
                             "logprobs": logprobs(job.logprobs)}],
                "usage": api.usage(stats)}

    def model_card() -> dict[str, Any]:
        return {"id": core.model_id, "object": "model", "created": core.created, "owned_by": "gemma-chat"}

    @app.get("/v1/models", response_model=api.ModelList, responses=ERROR_RESPONSES, summary="The loaded model")
    async def models() -> Any:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=api.ModelCard, responses=ERROR_RESPONSES,
             summary="The loaded model, by id")
    async def model(model_id: str) -> Any:
        if model_id != core.model_id:
            raise api.ApiError(404, f"the model {model_id!r} does not exist (this server has {core.model_id!r})",
                               code="model_not_found", param="model")
        return model_card()

    @app.get("/health", response_model=api.Health, summary="Liveness and slot use (no API key needed)")
    async def health() -> Any:
        return core.health()

    @app.post("/tokenize", response_model=api.TokenizeResponse, responses=ERROR_RESPONSES,
              summary="Text to tokens (llama.cpp's shape)")
    async def tokenize(body: api.TokenizeRequest) -> Any:
        def work() -> dict[str, Any]:
            tokens = core.engine.tokenize(body.content, special=body.parse_special, add_bos=body.add_special,
                                          limit=core.engine.n_ctx_seq)
            if body.with_pieces:
                return {"tokens": [{"id": token, "piece": core.token_piece(token)} for token in tokens]}
            return {"tokens": tokens}

        return await run_in_threadpool(work)

    @app.post("/detokenize", response_model=api.DetokenizeResponse, responses=ERROR_RESPONSES,
              summary="Tokens to text (llama.cpp's shape)")
    async def detokenize(body: api.DetokenizeRequest) -> Any:
        core.check_tokens(body.tokens, "tokens")
        return {"content": await run_in_threadpool(core.detokenize, body.tokens)}

    # llama.cpp also answers without the /v1 prefix; so do we (kept out of the schema).
    app.add_api_route("/chat/completions", chat_completions, methods=["POST"], include_in_schema=False)
    app.add_api_route("/completions", completions, methods=["POST"], include_in_schema=False)
    app.add_api_route("/models", models, methods=["GET"], include_in_schema=False)

"""Ollama's API on the same port: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version
(and /api/embed, /api/embeddings: gemmachat/server/embeddings_routes.py).

So that the `ollama` client libraries and Ollama-speaking apps work unchanged. Each request is
translated into the OpenAI request models (gemmachat/openai_api.py): the same validation,
sampling, slots and structured output; the answers are Ollama's, one JSON object or, streaming
(Ollama's default), one JSON object per line. `model` and `keep_alive` are accepted and ignored:
the loaded model answers, and it stays loaded (a request to unload is answered as Ollama answers
it). What would change the answer but cannot be done here (suffix, template, think) is refused.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any, AsyncIterator, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gemmachat import __version__, openai_api as api, tools
from gemmachat.server.core import ServerCore
from gemmachat.server.responses import finish_reason
from gemmachat.server.slots import Job
from gemmachat.structured import JSON_OBJECT_SCHEMA
from gemmachat.templates import Message, messages_of

# What /api/show says the model can do here: tools and embeddings are served for any model
# (gemmachat/tools.py, gemmachat/embeddings.py), Ollama's names for them.
CAPABILITIES = ["completion", "tools", "embedding"]
# Ollama's option names that mean what an OpenAI parameter means.
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
           "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "num_predict": "max_tokens", "stop": "stop"}
OPTION_NAMES = {openai: ollama for ollama, openai in OPTIONS.items()}
# A keep_alive of no time: a number, or Go's durations ("0s", "0h0m0s").
_ZERO = re.compile(r"(?:(?:0+\.?0*|\.0+)(?:ns|us|µs|ms|s|m|h))+|0+\.?0*|\.0+")
Request_ = TypeVar("Request_", api.ChatCompletionRequest, api.CompletionRequest)


class _Ollama(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="accepted and ignored: the loaded model answers")
    stream: bool = True
    # "" is no format, as in Ollama: its clients (langchain's OllamaLLM) send it by default.
    format: Literal["", "json"] | dict[str, Any] | None = Field(None, description='"json" or a JSON schema')
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = Field(None, description="accepted and ignored: the model stays loaded")
    think: bool | str | None = Field(None, description="refused unless false: the model here does not think")

    def refuse_thinking(self) -> None:
        # Refused, as Ollama refuses it for a model without thinking, rather than a reply that
        # silently lacks the thinking a client asked for.
        if self.think not in (None, False):
            raise api.ApiError(400, "thinking is not supported by this model", code="unsupported_value",
                               param="think")

    @property
    def unloads(self) -> bool:
        """keep_alive 0 ("0", "0s", "0m"): a request with nothing to generate then asks to unload."""
        return isinstance(self.keep_alive, (int, float, str)) and bool(_ZERO.fullmatch(str(self.keep_alive).strip()))

    def openai_fields(self, context: int) -> dict[str, Any]:
        """The OpenAI request's fields; `context` is what a sequence's context holds."""
        fields: dict[str, Any] = {}
        for name, value in (self.options or {}).items():
            if name in OPTIONS and value is not None:
                fields[OPTIONS[name]] = value
        limit = fields.get("max_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool):
            if limit < 0:  # Ollama's num_predict -1: until the model stops
                del fields["max_tokens"]
            else:  # Ollama stops where the context is full, however many more were asked for
                fields["max_tokens"] = min(limit, context)
        if self.format:
            fields["json_schema"] = JSON_OBJECT_SCHEMA if self.format == "json" else self.format
        return fields


def as_openai(request: type[Request_], **fields: Any) -> Request_:
    """The OpenAI request an Ollama one stands for. Ollama's `options` are only checked here (their
    values are free-form in Ollama's schema): a bad one is a 400 naming it, never a 500."""
    try:
        return request(**fields)
    except ValidationError as error:
        errors = []
        for item in error.errors():
            where = tuple(item.get("loc", ()))
            if where and where[0] in OPTION_NAMES:
                where = ("options", OPTION_NAMES[str(where[0])], *where[1:])
            errors.append({**item, "loc": where})
        raise api.validation_error(errors) from None


def images_refused(param: str) -> api.ApiError:
    # Refused, not dropped: the reply would otherwise talk about a picture the model never saw.
    return api.ApiError(400, "images are not supported (text only)", code="unsupported_value", param=param)


class OllamaToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    function: dict[str, Any] = Field(description='{"name": ..., "arguments": {...}}')


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[OllamaToolCall] | None = Field(None, description="an assistant's calls, as a reply gave them")
    tool_name: str | None = Field(None, description="a tool message: the tool whose result it holds")
    images: list[Any] | None = Field(None, description="refused: the model here reads text only")

    def openai(self) -> dict[str, Any]:
        """As an OpenAI message: Ollama's calls carry their arguments as an object, OpenAI's as JSON text."""
        if self.images:
            raise images_refused("messages")
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": str(call.function.get("name", "")),
                                                  "arguments": json.dumps(call.function.get("arguments", {}))}}
                for call in self.tool_calls]
        if self.tool_name:
            message["name"] = self.tool_name
        return message


class OllamaChatRequest(_Ollama):
    messages: list[OllamaMessage] = Field([], description="none: only load the model, as Ollama")
    tools: list[dict[str, Any]] | None = Field(None, description="functions the model may call, as OpenAI's")


class OllamaGenerateRequest(_Ollama):
    prompt: str = Field("", description="empty: only load the model, as Ollama")
    system: str | None = None
    images: list[Any] | None = Field(None, description="refused: the model here reads text only")
    raw: bool = Field(False, description="true: the prompt as it is, without the chat template")
    suffix: str | None = Field(None, description="refused: no fill-in-the-middle here")
    # Ollama's `template` is read from the extra fields, never declared: no request field names a
    # template or a file (tests/test_hostile_server.py).
    model_config = ConfigDict(extra="allow")

    def refuse_unsupported(self) -> None:
        # Refused, not ignored: an editor's completion that sends a suffix would get a plain
        # continuation that overwrites the code after the cursor.
        if self.suffix:
            raise api.ApiError(400, "suffix is not supported", code="unsupported_value", param="suffix")
        if (self.model_extra or {}).get("template"):
            raise api.ApiError(400, "template is not supported: the model's own chat template applies "
                               "(raw: true sends the prompt as it is)", code="unsupported_value", param="template")


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def add_routes(app: FastAPI, core: ServerCore) -> None:
    def details() -> dict[str, Any]:
        architecture = core.engine.info.architecture or "unknown"
        return {"format": "gguf", "family": architecture, "families": [architecture], "parameter_size": "",
                "quantization_level": ""}

    def card() -> dict[str, Any]:
        size = core.engine.path.stat().st_size - core.engine.info.start
        return {"name": core.model_id, "model": core.model_id, "digest": "", "size": size, "details": details(),
                "modified_at": datetime.datetime.fromtimestamp(core.created, datetime.timezone.utc).isoformat()}

    def timings(stats: Any) -> dict[str, Any]:
        return {"done_reason": "length" if finish_reason(stats) == "length" else "stop",
                "total_duration": int((stats.prompt_seconds + stats.generation_seconds) * 1e9), "load_duration": 0,
                "prompt_eval_count": stats.prompt_tokens,
                "prompt_eval_duration": int(stats.prompt_seconds * 1e9),
                "eval_count": stats.generated_tokens, "eval_duration": int(stats.generation_seconds * 1e9)}

    async def answer(request: Request, job: Job, stream: bool, piece: Any) -> Any:
        """Run the job: one object with the whole text, or NDJSON lines; piece(text) is the
        part of an object that carries text (a message for /api/chat, a response for /api/generate)."""
        job.stream = stream
        first = await core.begin(request, job)
        head = {"model": core.model_id}
        if not stream:
            text, stats = await core.collect(request, job, first)
            return {**head, "created_at": _now(), **piece(text), "done": True, **timings(stats)}
        job.stop_watching()

        async def lines() -> AsyncIterator[str]:
            async for kind, value in core.events(request, job, first):
                if kind == "text":
                    line = {**head, "created_at": _now(), **piece(value), "done": False}
                elif kind == "done":
                    line = {**head, "created_at": _now(), **piece(""), "done": True, **timings(value)}
                else:
                    line = {"error": value.message}
                yield json.dumps(line, ensure_ascii=False) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def tool_answer(request: Request, job: Job, plan: tools.ToolPlan, stream: bool) -> Any:
        """A reply that may be tool calls, known once its JSON is whole: one object or, streaming,
        the message in one line and then the closing line, as Ollama streams calls."""
        text, stats = await core.run_whole(request, job)
        content, calls = plan.calls(text)
        message: dict[str, Any] = {"role": "assistant", "content": content or ""}
        if calls:
            message["tool_calls"] = [{"function": call} for call in calls]
        head = {"model": core.model_id, "created_at": _now()}
        if not stream:
            return {**head, "message": message, "done": True, **timings(stats)}
        lines = [{**head, "message": message, "done": False},
                 {**head, "message": {"role": "assistant", "content": ""}, "done": True, **timings(stats)}]
        return StreamingResponse((json.dumps(line, ensure_ascii=False) + "\n" for line in lines),
                                 media_type="application/x-ndjson")

    def loaded(body: _Ollama, piece: dict[str, Any]) -> dict[str, Any]:
        """Ollama's answer to a request with nothing to generate, which clients send to load a model
        before it is needed (`ollama run` does) or, with keep_alive 0, to unload it: at once, as the
        model stays loaded."""
        return {"model": core.model_id, "created_at": _now(), **piece, "done": True,
                "done_reason": "unload" if body.unloads else "load"}

    @app.post("/api/chat", summary="Ollama's chat (NDJSON unless stream: false)")
    async def ollama_chat(body: OllamaChatRequest, request: Request) -> Any:
        body.refuse_thinking()
        if not body.messages:
            return loaded(body, {"message": {"role": "assistant", "content": ""}})
        chat = as_openai(api.ChatCompletionRequest, messages=[m.openai() for m in body.messages], tools=body.tools,
                         **body.openai_fields(core.engine.n_ctx_seq))
        job = await core.chat_job(chat)
        if chat.tool_plan is not None:
            return await tool_answer(request, job, chat.tool_plan, body.stream)
        return await answer(request, job, body.stream,
                            lambda text: {"message": {"role": "assistant", "content": text}})

    @app.post("/api/generate", summary="Ollama's completion of a prompt (NDJSON unless stream: false)")
    async def ollama_generate(body: OllamaGenerateRequest, request: Request) -> Any:
        if body.images:
            raise images_refused("images")
        body.refuse_thinking()
        body.refuse_unsupported()
        if not body.prompt:
            return loaded(body, {"response": ""})
        fields = body.openai_fields(core.engine.n_ctx_seq)
        if body.raw:
            job, _ = await core.completion_job(as_openai(api.CompletionRequest, prompt=body.prompt,
                                                         **{"max_tokens": None, **fields}))
        else:
            messages = messages_of(body.system, [Message("user", body.prompt)])
            job = await core.chat_job(as_openai(api.ChatCompletionRequest, messages=messages, **fields))
        return await answer(request, job, body.stream, lambda text: {"response": text})

    # HEAD too, as Ollama: its clients check that the server is up with HEAD / (page_routes.py).
    @app.api_route("/api/tags", methods=["GET", "HEAD"], summary="Ollama's list of models: the loaded one")
    async def ollama_tags() -> Any:
        return {"models": [card()]}

    @app.get("/api/ps", summary="Ollama's running models: the loaded one")
    async def ollama_ps() -> Any:
        return {"models": [{**card(), "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": core.engine.n_ctx_seq}]}

    @app.post("/api/show", summary="Ollama's model details")
    async def ollama_show(body: OllamaShowRequest) -> Any:
        info = core.engine.info
        architecture = info.architecture or "unknown"
        return {"modelfile": "", "parameters": "", "template": info.chat_template or "", "details": details(),
                "model_info": {"general.architecture": architecture, "general.name": info.name,
                               f"{architecture}.context_length": core.engine.n_ctx_train},
                "capabilities": CAPABILITIES, "modified_at": card()["modified_at"]}

    @app.api_route("/api/version", methods=["GET", "HEAD"], summary="Ollama's version call: gemma-chat's version")
    async def ollama_version() -> Any:
        return {"version": __version__}

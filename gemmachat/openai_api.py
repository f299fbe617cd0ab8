"""OpenAI's API as data: request models (validated), response bodies, and the error object.

The request models are strict (a string where a number belongs is an error, not a coercion) and
ignore fields they do not know, as OpenAI's own API does for harmless additions. Parameters we
cannot honour (n > 1, non-text content) are errors that say so rather than being silently dropped.
"""

from __future__ import annotations

import re
import time
import uuid
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import ErrorDetails

from gemmachat.errors import one_line
from gemmachat.structured import JSON_OBJECT_SCHEMA, SchemaRefused, check_grammar, grammar_for_schema
from gemmachat.tools import ToolPlan, ToolsRefused, plan_for

if TYPE_CHECKING:
    from gemmachat.engine import Stats, TokenLogprob

MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs

# Fields whose numbers must be finite: JSON parsers in Python accept NaN and Infinity.
_finite = {"allow_inf_nan": False}

# A UTF-16 surrogate escape in a JSON string: a pair (kept) or one alone (replaced). The escape
# must follow an even number of backslashes, or "\\ud800" (a backslash, then letters) would match.
_SURROGATE_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)(\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|"
                               rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2})")


class ApiError(Exception):
    """An error answered with OpenAI's error object and an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        message = one_line(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def replace_lone_surrogates(body: bytes) -> bytes:
    """A JSON body with each lone surrogate escape ("\\ud800") spelled U+FFFD instead, as a bad byte
    in a prompt file reads: Python would parse it into a string that cannot be encoded, and the
    reply that echoes it (or streams it) would fail. Same length, so Content-Length still holds."""
    if not re.search(rb"\\u[dD][89a-fA-F]", body):
        return body
    return _SURROGATE_ESCAPE.sub(
        lambda match: match.group(0) if len(match.group(2)) == 12 else match.group(1) + b"\\ufffd", body)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def validation_error(errors: list[ErrorDetails] | list[dict[str, Any]]) -> ApiError:
    """FastAPI's validation errors (422) as one OpenAI-style 400 with a one-line message."""
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
    kind = str(first.get("type", ""))
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON{': ' + str(detail) if detail else ''}",
                        code="invalid_json")
    # Union members show up in the location ("stop.str", "stop.list[str]"): keep the field path.
    path = ".".join(part for part in location if not _is_union_tag(part))
    param = location[0] if location else None
    if kind == "missing" and not path:
        return ApiError(400, "the request body is empty: send a JSON object", code="missing_required_parameter")
    if kind == "missing":
        return ApiError(400, f"missing required parameter: '{path}'", code="missing_required_parameter",
                        param=param)
    if not path:
        return ApiError(400, f"the request body must be a JSON object ({first.get('msg', 'invalid')})",
                        code="invalid_value")
    return ApiError(400, f"invalid value for '{path}': {first.get('msg', 'invalid')}", code="invalid_value",
                    param=param)


def _is_union_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list[str]", "list[int]", "list[ContentPart]"} or (
        part.startswith(("list[", "dict[")) or part[:1].isupper()
    )


# -- requests --------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str = Field(description="system, developer, user, assistant or tool")
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = Field(None, description="an assistant's calls, as a reply gave them")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.type != "text":
                raise ApiError(400, f"content parts of type {part.type!r} are not supported (text only)",
                               code="unsupported_value", param="messages")
            if part.text is None:
                raise ApiError(400, "a content part of type 'text' has no 'text'", param="messages")
            pieces.append(part.text)
        return "".join(pieces)


def _grammar(*, param: str, grammar: str | None = None, schema: object = None) -> str | None:
    if grammar is not None and schema is not None:
        raise ApiError(400, "give grammar or json_schema, not both", code="invalid_value", param=param)
    try:
        if grammar is not None:
            return check_grammar(grammar)
        return None if schema is None else grammar_for_schema(schema)
    except SchemaRefused as refused:
        raise ApiError(400, str(refused), code="unsupported_value", param=param) from None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: str | None = Field(None, description="accepted and ignored: the loaded model answers")
    temperature: float | None = Field(None, ge=0, le=2, **_finite)
    top_p: float | None = Field(None, ge=0, le=1, **_finite)
    n: int | None = Field(None, ge=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} strings")
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, **_finite)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, **_finite)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # llama.cpp's extensions
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1, **_finite)
    repeat_penalty: float | None = Field(None, gt=0, le=10, **_finite)
    cache_prompt: bool = Field(True, description=(
        "reuse what the slot's KV cache holds of this prompt (llama.cpp's option); false evaluates the "
        "prompt from scratch, which makes temperature-0 output independent of earlier requests"))
    ignore_eos: bool = Field(False, description="never end at an end-of-generation token (llama.cpp's option)")
    grammar: str | None = Field(None, description="a llama.cpp GBNF grammar the output must follow (llama.cpp's option)")
    json_schema: dict[str, Any] | None = Field(None, description=(
        "a JSON schema the output must be valid under (llama.cpp's option; see response_format)"))

    def output_grammar(self) -> str | None:
        """The grammar this request constrains its output with, if any."""
        return _grammar(grammar=self.grammar, schema=self.json_schema, param="json_schema")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"at most {MAX_STOPS} stop strings", code="invalid_value", param="stop")
        return tuple(stop for stop in stops if stop)

    def check_common(self) -> None:
        if self.n is not None and self.n > 1:
            raise ApiError(400, "n > 1 is not supported: this server returns one choice per request",
                           code="unsupported_value", param="n")


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="each generated token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with logprobs: the most likely tokens at each position, and theirs")
    tools: list[Any] | None = Field(None, description="functions the model may call (gemmachat/tools.py: the format)")
    tool_choice: Any = Field(None, description="none, auto, required, or {\"type\": \"function\", ...}")
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", code="invalid_value", param="top_logprobs")
        if self.tool_plan is not None and (self.response_format or self.grammar or self.json_schema):
            raise ApiError(400, "tools and response_format (or grammar, json_schema) cannot be used together",
                           code="unsupported_value", param="tools")

    @cached_property
    def tool_plan(self) -> ToolPlan | None:
        try:
            return plan_for(self.tools or [], self.tool_choice, self.parallel_tool_calls)
        except (ToolsRefused, SchemaRefused) as refused:
            raise ApiError(400, str(refused), code="invalid_value", param="tools") from None

    def output_grammar(self) -> str | None:
        if self.tool_plan is not None:
            return self.tool_plan.grammar
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return super().output_grammar()
        if kind == "json_object":
            return _grammar(schema=JSON_OBJECT_SCHEMA, param="response_format")
        if kind == "json_schema":
            spec = self.response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ApiError(400, "response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                               code="invalid_value", param="response_format")
            return _grammar(schema=spec["schema"], param="response_format")
        raise ApiError(400, f"response_format type {kind!r} is not one of text, json_object, json_schema",
                       code="invalid_value", param="response_format")

    def logprobs_wanted(self) -> int | None:
        # A reply with tools is answered without logprobs (server/openai_routes.py, tool_answer): none
        # are computed.
        return (self.top_logprobs or 0) if self.logprobs and self.tool_plan is None else None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] = Field(description="one string (or a list of one), or token ids")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "each generated token's log-probability, and this many most likely tokens at each position"))

    def check(self) -> None:
        self.check_common()
        if self.best_of is not None and self.best_of > 1:
            raise ApiError(400, "best_of > 1 is not supported", code="unsupported_value", param="best_of")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", code="unsupported_value", param="suffix")
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ApiError(400, "the prompt is an empty list", code="invalid_value", param="prompt")
            if isinstance(self.prompt[0], str) and len(self.prompt) > 1:
                raise ApiError(400, "several prompts in one request are not supported: send one",
                               code="unsupported_value", param="prompt")


    def logprobs_wanted(self) -> int | None:
        return self.logprobs


def chat_logprobs(entries: list[TokenLogprob], piece: Callable[[int], bytes]) -> dict[str, Any]:
    """A chat completion's `logprobs`, as OpenAI's: a token's text, its bytes and its log-probability."""

    def described(token: int, logprob: float) -> dict[str, Any]:
        data = piece(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    return {"content": [{**described(entry.token, entry.logprob),
                         "top_logprobs": [described(token, logprob) for token, logprob in entry.top]}
                        for entry in entries],
            "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], piece: Callable[[int], bytes],
                        offset: int) -> tuple[dict[str, Any], int]:
    """A completion's `logprobs`, in OpenAI's older shape (lists side by side), and where the text
    after these tokens starts; `offset` is where the first token's text starts in the choice's text
    (after an echoed prompt, or the tokens of earlier chunks)."""
    texts = [piece(entry.token).decode("utf-8", errors="replace") for entry in entries]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{piece(token).decode("utf-8", errors="replace"): logprob for token, logprob in entry.top}
                             for entry in entries],
            "text_offset": offsets}, offset


class TokenizeRequest(_Strict):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    tokens: list[int]


# -- responses -------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens reused from the slot's KV cache, not evaluated again")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the reply is tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class _Answer(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str | None = None
    usage: Usage


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int]


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeResponse(BaseModel):
    content: str


class Health(BaseModel):
    status: str
    slots_idle: int
    slots_processing: int
    requests_waiting: int


def usage(stats: Stats) -> dict[str, Any]:
    # cached_tokens as OpenAI reports its prompt caching (and llama-server its KV cache reuse), so
    # that a client can tell how much of its prompt the server did not evaluate again.
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())

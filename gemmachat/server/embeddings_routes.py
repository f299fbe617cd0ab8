"""Embeddings over HTTP: OpenAI's POST /v1/embeddings, Ollama's POST /api/embed and its older
POST /api/embeddings, all computed by Engine.embed (gemmachat/embeddings.py).

Inputs are bounded: at most MAX_INPUTS of them (OpenAI's own limit), each at most the context of a
slot in tokens (Ollama's `truncate`, on by default as in Ollama, cuts a longer one to fit instead);
the request body limit bounds the rest. Inputs run one at a time, in chunks between two decode
steps, so generations in flight go on meanwhile; a client that hangs up, or the server stopping,
ends the work at the next chunk.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from gemmachat import openai_api as api
from gemmachat.errors import PromptTooLong
from gemmachat.server.core import ServerCore
from gemmachat.server.responses import ERROR_RESPONSES, shutting_down
from gemmachat.server.slots import ClientGone

MAX_INPUTS = 2048


class EmbeddingRequest(api._Strict):  # noqa: SLF001 - the OpenAI request models' strictness
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, token ids, or a list of token id lists")
    model: str | None = Field(None, description="accepted and ignored: the loaded model answers")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's own size is supported")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class _OllamaEmbed(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="accepted and ignored: the loaded model answers")
    options: dict[str, Any] | None = Field(None, description="accepted and ignored")
    keep_alive: str | int | float | None = Field(None, description="accepted and ignored: the model stays loaded")


class OllamaEmbedRequest(_OllamaEmbed):
    input: str | list[str]
    truncate: bool = Field(True, description="cut an input longer than the context to fit (else a 400)")
    dimensions: int | None = Field(None, ge=1, description="only the model's own size is supported")


class OllamaEmbeddingsRequest(_OllamaEmbed):
    prompt: str = ""


class Embedded:
    """What a list of inputs came to: their vectors and how many tokens they were."""

    def __init__(self) -> None:
        self.vectors: list[list[float]] = []
        self.tokens = 0


def _check_dimensions(core: ServerCore, dimensions: int | None) -> None:
    if dimensions is not None and dimensions != core.engine.n_embd:
        raise api.ApiError(400, f"dimensions {dimensions} is not supported: this model's embeddings have "
                           f"{core.engine.n_embd}, and they are not shortened", code="unsupported_value",
                           param="dimensions")


def _text_tokens(core: ServerCore, text: str, where: str, truncate: bool) -> list[int]:
    engine, limit = core.engine, core.engine.n_ctx_seq
    if truncate:
        # Enough characters for more than `limit` tokens (no token is longer than the longest),
        # so that a huge text is not tokenized whole only to be cut.
        text = text[:limit * engine.longest_token()]
    # Cut to fit, a text cannot have more tokens than bytes (and a BOS): no PromptTooLong then.
    bound = len(text.encode("utf-8", "surrogatepass")) + 1 if truncate else limit
    try:
        tokens = engine.tokenize(text, special=core.settings.special, add_bos=engine.add_bos, limit=bound)
    except PromptTooLong:
        raise api.ApiError(400, f"{where} is more than the {limit} tokens an embedding can take",
                           code="context_length_exceeded", param="input") from None
    return tokens[:limit]


async def embed(core: ServerCore, request: Request, inputs: list[str] | list[list[int]], *,
                normalize: bool = True, truncate: bool = False) -> Embedded:
    """The embeddings of `inputs` (texts, or token id lists), in order; a 400 for a bad one
    before any is computed."""
    if not inputs:
        raise api.ApiError(400, "input is empty: give a text or a list of texts", code="invalid_value",
                           param="input")
    if len(inputs) > MAX_INPUTS:
        raise api.ApiError(400, f"{len(inputs)} inputs are more than the {MAX_INPUTS} one request may have",
                           code="invalid_value", param="input")

    def tokenized() -> list[list[int]]:
        lists = []
        for index, item in enumerate(inputs):
            where = f"input[{index}]" if len(inputs) > 1 else "input"
            if isinstance(item, str):
                tokens = _text_tokens(core, item, where, truncate)
            else:
                tokens = list(item)
                core.check_tokens(tokens, "input")
            if not tokens:
                raise api.ApiError(400, f"{where} is empty", code="invalid_value", param="input")
            lists.append(tokens)
        return lists

    token_lists = await run_in_threadpool(tokenized)
    gone = threading.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        gone.set()

    def stop() -> bool:  # checked between chunks, on the decoding thread's side
        return gone.is_set() or core.closing

    watcher = asyncio.create_task(watch())
    embedded = Embedded()
    started = time.perf_counter()
    try:
        for tokens in token_lists:
            vector = None if stop() else await run_in_threadpool(core.engine.embed, tokens, normalize, stop)
            if vector is None:
                raise ClientGone() if gone.is_set() else shutting_down()
            embedded.vectors.append(vector)
            embedded.tokens += len(tokens)
    finally:
        watcher.cancel()
    core.metrics.record_embedding(embedded.tokens, time.perf_counter() - started)
    request.scope["gemma.log"] = f"embedded {len(token_lists)} inputs, {embedded.tokens} tokens"
    return embedded


def _base64(vector: list[float]) -> str:
    # OpenAI's base64 encoding: the float32 values, little-endian, as the SDKs decode them.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def add_routes(app: FastAPI, core: ServerCore) -> None:
    @app.post("/v1/embeddings", response_model=EmbeddingList, responses=ERROR_RESPONSES,
              summary="Embeddings of texts or token ids (pooled and normalised, as llama-server's)")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
        _check_dimensions(core, body.dimensions)
        # One text or one token list is one input; a list of either, several.
        single = isinstance(body.input, str) or (bool(body.input) and isinstance(body.input[0], int))
        done = await embed(core, request, [body.input] if single else body.input)  # type: ignore[list-item]
        shape = _base64 if body.encoding_format == "base64" else (lambda vector: vector)
        return {"object": "list", "model": core.model_id,
                "data": [{"object": "embedding", "index": index, "embedding": shape(vector)}
                         for index, vector in enumerate(done.vectors)],
                "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens}}

    @app.post("/api/embed", summary="Ollama's embeddings (normalised)")
    async def ollama_embed(body: OllamaEmbedRequest, request: Request) -> Any:
        _check_dimensions(core, body.dimensions)
        done = await embed(core, request, [body.input] if isinstance(body.input, str) else body.input,
                           truncate=body.truncate)
        return {"model": core.model_id, "embeddings": done.vectors, "prompt_eval_count": done.tokens}

    @app.post("/api/embeddings", summary="Ollama's older embeddings call (one prompt, not normalised, as Ollama's)")
    async def ollama_embeddings(body: OllamaEmbeddingsRequest, request: Request) -> Any:
        if not body.prompt:
            return {"embedding": []}  # as Ollama answers an empty prompt
        done = await embed(core, request, [body.prompt], normalize=False, truncate=True)
        return {"embedding": done.vectors[0]}

    app.add_api_route("/embeddings", embeddings, methods=["POST"], include_in_schema=False)

"""Embeddings of text by the loaded model, as llama-server computes them with `--embeddings`.

A second llama.cpp context on the same weights, with embeddings on: the generation context cannot
pool (its pooling type is fixed when it is made), and it stays as it was. The context is made at
the first request (Engine.embed), so a server that is never asked for embeddings pays nothing
for it; it holds one input at a time, of up to its whole size, in one batch, because a pooled
embedding needs the whole input in one ubatch.

Pooling is the GGUF's `<arch>.pooling_type` when it names one, else mean: a generative model
such as Gemma names none, and llama.cpp would then pool nothing (one vector per token), which
OpenAI's and Ollama's embeddings cannot carry. Vectors are normalised to unit length (Euclidean),
as llama-server's are by default.
"""

from __future__ import annotations

import ctypes
import math

from gemmachat import llama_log
from gemmachat.bindings import llama_cpp as llama
from gemmachat.errors import UserError

_POOLING = {llama.LLAMA_POOLING_TYPE_MEAN: "mean", llama.LLAMA_POOLING_TYPE_CLS: "cls",
            llama.LLAMA_POOLING_TYPE_LAST: "last"}


def pooling_for(gguf_pooling: object) -> int:
    """The pooling the GGUF asks for if it is one that gives a vector per input, else mean."""
    return gguf_pooling if isinstance(gguf_pooling, int) and gguf_pooling in _POOLING else llama.LLAMA_POOLING_TYPE_MEAN


class Embedder:
    """The embeddings context. Only the engine's decoding thread may use it, as with the other."""

    def __init__(self, model: llama.llama_model_p, size: int, threads: int, flash_attn: int, pooling: int) -> None:
        params = llama.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = pooling
        params.n_ctx = params.n_batch = params.n_ubatch = size
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = flash_attn
        llama_log.clear_errors()
        self._ctx = llama.llama_init_from_model(model, params)
        if not self._ctx:
            raise UserError(f"cannot create an embeddings context of {size} tokens: "
                            f"{llama_log.last_error() or 'out of memory?'}")
        self.size = size
        self.pooling = _POOLING[pooling]
        self.dimensions = int(llama.llama_model_n_embd_out(model))
        self._memory = llama.llama_get_memory(self._ctx)

    def embed(self, tokens: list[int], normalize: bool = True) -> list[float]:
        """The pooled embedding of `tokens` (1 to `size` of them)."""
        if not 0 < len(tokens) <= self.size:
            raise ValueError(f"{len(tokens)} tokens for an embeddings context of {self.size}")
        llama.llama_memory_clear(self._memory, True)
        array = (llama.llama_token * len(tokens))(*tokens)
        status = llama.llama_decode(self._ctx, llama.llama_batch_get_one(array, len(tokens)))
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} computing an embedding")
        pointer = llama.llama_get_embeddings_seq(self._ctx, 0)
        if not pointer:
            raise RuntimeError("llama.cpp gave no pooled embedding")
        vector = list(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))[:self.dimensions])
        if not normalize:
            return vector
        # As llama.cpp's common_embd_normalize with its default (2): the sum in double precision.
        norm = math.sqrt(math.fsum(value * value for value in vector))
        scale = 1.0 / norm if norm > 0 else 0.0
        return [value * scale for value in vector]

    def close(self) -> None:
        llama.llama_free(self._ctx)

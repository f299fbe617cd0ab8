"""Embeddings of text by the loaded model, as llama-server computes them with `--embeddings`.

A second llama.cpp context on the same weights, with embeddings on: the generation context cannot
pool (its pooling type is fixed when it is made), and it stays as it was. The context is made at
the first request (Engine.embed), so a server that is never asked for embeddings pays nothing
for it.

Pooling is the GGUF's `<arch>.pooling_type` when it names one (an embedding model), else mean: a
generative model such as Gemma names none, and llama.cpp would then pool nothing. Vectors are
normalised to unit length (Euclidean), as llama-server's are by default.

Mean pooling of a generative model is done here, over llama.cpp's per-token embeddings, with the
input fed in chunks of CHUNK tokens through the KV cache. llama.cpp's own pooling needs the whole
input in one batch, and an embeddings context computes the output layer for every token of a
batch: with Gemma's 262,144-token vocabulary that is 1 MiB of logits a token, and a 1,024-token
input grew the process by 2 GiB. In chunks it stays within about CHUNK MiB whatever the input,
and the engine lets generations run between two chunks. Attention is causal, so a token's embedding is the
same whichever chunk it is computed in (up to float rounding), and so is their mean.
"""

from __future__ import annotations

import ctypes
import math

from gemmachat import llama_log
from gemmachat.bindings import llama_cpp as llama
from gemmachat.errors import UserError

# 128 MiB of logits for Gemma; smaller chunks cost speed (512 tokens on 2 busy cores: 17 s in
# chunks of 64, 12 s of 128, 9 s of 256, 6.5 s in one batch).
CHUNK = 128
_POOLING = {llama.LLAMA_POOLING_TYPE_MEAN: "mean", llama.LLAMA_POOLING_TYPE_CLS: "cls",
            llama.LLAMA_POOLING_TYPE_LAST: "last"}


class Embedder:
    """The embeddings context, and the input being embedded. Only the engine's decoding thread may
    call into it (as with the other context), one input at a time (Engine.embed sees to both)."""

    def __init__(self, model: llama.llama_model_p, size: int, threads: int, flash_attn: int,
                 gguf_pooling: int | None) -> None:
        # An embedding model's own pooling, by llama.cpp, in one batch; else mean, here, in chunks.
        self.pooled_by_llama = gguf_pooling in _POOLING
        self.pooling = _POOLING[gguf_pooling] if gguf_pooling in _POOLING else "mean"
        self.chunk = size if self.pooled_by_llama else CHUNK
        params = llama.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = gguf_pooling if self.pooled_by_llama else llama.LLAMA_POOLING_TYPE_NONE
        params.n_ctx = size
        params.n_batch = params.n_ubatch = self.chunk
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = flash_attn
        llama_log.clear_errors()
        self._ctx = llama.llama_init_from_model(model, params)
        if not self._ctx:
            raise UserError(f"cannot create an embeddings context of {size} tokens: "
                            f"{llama_log.last_error() or 'out of memory?'}")
        self.size = size
        self.dimensions = int(llama.llama_model_n_embd_out(model))
        self._memory = llama.llama_get_memory(self._ctx)
        self._sum: list[float] = []
        self._count = 0

    def start(self) -> None:
        llama.llama_memory_clear(self._memory, True)
        self._sum = [0.0] * self.dimensions
        self._count = 0

    def feed(self, tokens: list[int]) -> None:
        """The next chunk of the input (at most `chunk` tokens)."""
        array = (llama.llama_token * len(tokens))(*tokens)
        status = llama.llama_decode(self._ctx, llama.llama_batch_get_one(array, len(tokens)))
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} computing an embedding")
        if self.pooled_by_llama:
            self._add(llama.llama_get_embeddings_seq(self._ctx, 0), 1)
        else:
            self._add(llama.llama_get_embeddings(self._ctx), len(tokens))

    def _add(self, pointer: object, rows: int) -> None:
        if not pointer:
            raise RuntimeError("llama.cpp gave no embeddings")
        values = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))[:rows * self.dimensions]
        total = self._sum
        for row in range(rows):
            for index, value in enumerate(values[row * self.dimensions:(row + 1) * self.dimensions]):
                total[index] += value
        self._count += rows

    def result(self, normalize: bool) -> list[float]:
        vector = [value / self._count for value in self._sum]
        if not normalize:
            return vector
        # As llama.cpp's common_embd_normalize with its default (2): the sum in double precision.
        norm = math.sqrt(math.fsum(value * value for value in vector))
        scale = 1.0 / norm if norm > 0 else 0.0
        return [value * scale for value in vector]

    def close(self) -> None:
        llama.llama_free(self._ctx)

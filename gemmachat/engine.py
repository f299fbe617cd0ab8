"""The model and its llama.cpp context, driven token by token through llama-cpp-python's C API.

We do not use llama_cpp.Llama: its completion path re-detokenizes the whole reply at every token
and keeps one KV state per object. Here, sampling stays in llama.cpp's sampler chain, each token is
turned into bytes once, and every conversation (sequence) owns a list of tokens that mirrors what
the KV cache holds for it, so a new turn evaluates only what is new. Sequences generating at the
same time (the server's slots, the chat beside them) share each llama_decode.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import hashlib
import os
import re
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from gemmachat import _logits, backends, llama_log
from gemmachat.bindings import llama_cpp as llama
from gemmachat.cpu import decide_repack
from gemmachat.embeddings import Embedder
from gemmachat.errors import PromptTooLong, UserError, warn
from gemmachat.gguf import GGUFInfo
from gemmachat.settings import BASE_MODEL_REPLY_CAP, DEFAULT_CTX_CAP, Sampling, Settings, default_threads
from gemmachat.templates import Renderer, Template, make_renderer
from gemmachat.threads import ThreadGovernor, fixed_threads_notice, read_cpu_times, usable_cpus

if TYPE_CHECKING:
    from gemmachat.model_path import ModelFile

ALL_LAYERS = 999
# Prompt tokens evaluated per step while other sequences generate: about a quarter of a second of
# prompt work on a 2-core CPU with a small model, so a new request delays running ones by that much
# per token rather than by its whole prompt.
PROMPT_CHUNK = 128
# llama.cpp's tokenizer takes time quadratic in the special tokens of one call ("s\n\n" * 40000,
# 120 KB: 28 s). A long text is first counted in pieces of this many characters, so that text
# longer than the context is refused after a few milliseconds of pieces, not after all of it.
COUNT_PIECE = 4096
# Pieces end before a space or line break that follows a word, where a cut changes the fewest
# tokens (a word keeps its leading space). A cut may still add a few tokens (a tag or a special
# token cut in two: at most 6 in 800 texts we tried, for <start_of_turn> repeated with --special), so
# text is refused only when its pieces count more than the limit plus this many per cut.
CUT_MARGIN = 8
_CUT_BEFORE = re.compile(r"(?<=\S)\s")
# How long close() waits for calls into llama.cpp from other threads: they stop at their next piece.
CLOSE_WAIT_SECONDS = 5.0
# Decode steps that running generations get between two chunks of an embedding. Beside a 2,048-token
# embedding on 2 busy cores, a 40-token chat reply took 15 s instead of 5 s alone (with one step a
# chunk: a token every 3 s), and the embedding about as long as without it.
EMBEDDING_YIELD_STEPS = 16


class EngineClosed(RuntimeError):
    """The model is being unloaded (the program is stopping): no more calls into llama.cpp."""


@dataclass(frozen=True)
class EngineOptions:
    ctx_size: int | None = None
    n_gpu_layers: int = 0
    threads: int = 2
    # Decode with as many of `threads` as other processes leave free (gemmachat/threads.py); -t
    # on the command line fixes the count instead.
    adapt_threads: bool = False
    # llama.cpp's extra weight buffers (repacked and AMX kernels); off as --no-repack (cpu.py).
    repack: bool = True
    batch_size: int = 2048
    ubatch_size: int = 512
    flash_attn: str = "auto"
    mlock: bool = False
    mmap: bool = True
    sequences: int = 1
    # One KV pool that any sequence may fill (the chat beside its server needs its whole -c), or,
    # when False, -c split evenly between the sequences as llama-server -np N does: each has its
    # own cells, so one can never run out of room because of another.
    shared_kv: bool = True
    # Decode on the reading thread instead of a scheduler thread: for a single reader (--cli),
    # which then prints between two decodes as llama-completion does, with no thread hand-off per
    # token. Only that one thread may use the engine.
    inline: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, sequences: int = 1, shared_kv: bool = True,
                      inline: bool = False) -> EngineOptions:
        return cls(
            ctx_size=settings.ctx_size,
            n_gpu_layers=settings.n_gpu_layers,
            threads=settings.threads or default_threads(),
            adapt_threads=settings.threads is None,
            repack=not settings.no_repack,
            batch_size=settings.batch_size,
            ubatch_size=settings.ubatch_size,
            flash_attn=settings.flash_attn,
            mlock=settings.mlock,
            mmap=settings.mmap,
            sequences=sequences,
            shared_kv=shared_kv,
            inline=inline,
        )


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens already in the KV cache, not evaluated again
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (end of turn or a stop string), "length" or "cancelled"
    # A remote server reports what it reports: False where its usage left the counts out (the
    # token counts), or said nothing of its prompt cache (reused_tokens). /stats says "unknown".
    counted: bool = True
    reuse_counted: bool = True

    @property
    def evaluated_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.evaluated_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0


@dataclass(frozen=True)
class DecodeTimes:
    """llama.cpp's counters for this context, as llama-completion's perf report shows them: batches
    of several tokens count as prompt evaluation, single-token decodes as generation ("runs")."""

    prompt_ms: float
    prompt_tokens: int
    eval_ms: float
    eval_runs: int
    graphs_reused: int


@dataclass
class Sequence:
    """One conversation's slice of the KV cache: `tokens` is exactly what the cache holds for it."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (the log-softmax of the logits it was
    sampled from, before any sampler), and the `top` most likely tokens there with theirs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(eq=False)
class _Job:
    """A generation as the scheduler sees it."""

    sequence: Sequence
    sampler: llama.llama_sampler_p
    grammar: llama.llama_sampler_p | None  # kept out of the chain: see Engine._sample_with_grammar
    max_tokens: int
    ignore_eos: bool
    cancelled: Callable[[], bool] | None
    pending: list[int]  # prompt tokens not evaluated yet (the whole prompt until admitted)
    reused: int = 0  # prompt tokens found in the KV cache when admitted
    next_token: int | None = None  # sampled, to be decoded at the next step
    out: deque[int] = field(default_factory=deque)  # sampled, not read by the consumer yet
    sampled: int = 0
    finish: str = ""  # set when the scheduler is done with it: "stop", "length", "cancelled", "error"
    error: Exception | None = None
    first_token_at: float = 0.0
    released: bool = False  # the consumer is done with it
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives each
    sampled_logprob: TokenLogprob | None = None  # the latest sampled token's, until _take
    out_logprobs: deque[TokenLogprob] = field(default_factory=deque)  # beside `out`


@dataclass(eq=False)
class _Call:
    """Work on the context that the scheduler does between two steps, for another thread."""

    work: Callable[[], object]
    result: object = None
    error: Exception | None = None
    done: bool = False


@dataclass
class Generation:
    """A running generation: iterate it for text pieces; `stats` and `tokens` fill as it goes."""

    pieces: Iterator[str]
    stats: Stats
    tokens: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked for

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def text(self) -> str:
        return "".join(self.pieces)


_FLASH_ATTN = {
    "auto": llama.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
_backend_ready = False


def init_backends() -> None:
    """Load llama.cpp's backends (gemmachat/backends.py) and initialise it, once per process."""
    global _backend_ready
    if not _backend_ready:
        backends.load()
        llama.llama_backend_init()
        _backend_ready = True


def gpu_offload_supported() -> bool:
    init_backends()
    return bool(llama.llama_supports_gpu_offload())


def no_gpu_message(verbose: bool) -> str:
    """Why -ngl offloads nothing, in one line."""
    if not backends.gpu_modules():
        return "no GPU found, running on the CPU (this llama.cpp build has no GPU support: README, GPU)"
    reason = backends.gpu_module_error()
    return "no GPU found, running on the CPU" + (f" ({reason})" if verbose and reason else "")


@functools.cache
def _stdio() -> ctypes.CDLL | None:
    """The C library's stdio, to hand llama.cpp a FILE positioned inside the single file. Not on
    Windows: a FILE cannot cross from one C runtime (Python's) to another (llama.dll's)."""
    if os.name == "nt":
        return None
    libc = ctypes.CDLL(None)
    libc.fdopen.argtypes, libc.fdopen.restype = [ctypes.c_int, ctypes.c_char_p], ctypes.c_void_p
    libc.fseeko.argtypes, libc.fseeko.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_int
    libc.fclose.argtypes, libc.fclose.restype = [ctypes.c_void_p], ctypes.c_int
    return libc


@functools.cache
def _load_from_file_ptr() -> Callable[..., int] | None:
    """llama.cpp's loader for a GGUF that starts where an open FILE stands (llama.h:
    llama_model_load_from_file_ptr); llama-cpp-python has no binding for it, libllama has."""
    function = getattr(llama.llama_cpp._lib, "llama_model_load_from_file_ptr", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_void_p, llama.llama_model_params]
    function.restype = llama.llama_model_p_ctypes
    return function


@functools.cache
def _library_identity() -> str:
    """Which build of libllama this is (a hash of the library, a few milliseconds once): a saved KV
    cache is restored only into the llama.cpp that wrote it. Not the file's time, which each
    unpacking of the single file renews; not package metadata, which the frozen program lacks."""
    return hashlib.sha256(Path(llama.llama_cpp._lib._name).read_bytes()).hexdigest()[:16]


def loads_at_offset() -> bool:
    """Whether llama.cpp can map a GGUF in place inside a larger file here."""
    return _stdio() is not None and _load_from_file_ptr() is not None


def _load_at(path: Path, start: int, params: llama.llama_model_params) -> llama.llama_model_p:
    """Load the GGUF that starts at byte `start` of `path`. llama.cpp maps the whole file and
    reads the tensors at their offsets in it, so the weights are used where they lie."""
    libc, load = _stdio(), _load_from_file_ptr()
    assert libc is not None and load is not None, "the caller checks loads_at_offset()"
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    stream = libc.fdopen(fd, b"rb")
    if not stream:
        os.close(fd)
        raise UserError(f"cannot load model {path}: cannot open it")
    try:
        if libc.fseeko(stream, start, os.SEEK_SET) != 0:
            raise UserError(f"cannot load model {path}: cannot seek to its GGUF at byte {start}")
        # Once loaded, the model keeps its mapping, not the stream.
        return load(stream, params)
    finally:
        libc.fclose(stream)


class Engine:
    def __init__(self, path: Path, info: GGUFInfo, options: EngineOptions, name: str | None = None) -> None:
        init_backends()
        self.path = path  # the file that holds the GGUF from byte info.start on
        self.name = name or path.name  # the GGUF's file name, for people to read
        self.info = info
        self.options = options
        # Its first reading now: loading the model is the window its first decision looks at.
        self._governor = ThreadGovernor(options.threads) if options.adapt_threads else None
        self.threads = options.threads  # what the next decode uses
        self.repack = decide_repack(no_repack=not options.repack)
        self._model = self._load_model(path, info.start, options, self.repack.use_extra_buffers)
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self._vocab))
        self._candidate_data: ctypes.Array | None = None  # for grammar sampling, made on first use
        self.n_ctx_train = int(llama.llama_model_n_ctx_train(self._model))
        self.n_layer = int(llama.llama_model_n_layer(self._model))
        self.n_swa = int(llama.llama_model_n_swa(self._model))
        self._ctx = self._new_context(options)
        self.n_ctx = int(llama.llama_n_ctx(self._ctx))
        self.n_ctx_seq = int(llama.llama_n_ctx_seq(self._ctx))
        self.n_batch = int(llama.llama_n_batch(self._ctx))
        self.n_ubatch = int(llama.llama_n_ubatch(self._ctx))
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self.bos = int(llama.llama_vocab_bos(self._vocab))
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self._vocab))
        self.eos = int(llama.llama_vocab_eos(self._vocab))
        self._pieces: dict[int, bytes] = {}
        self._eog_tokens: list[int] | None = None
        self._sequences: dict[int, Sequence] = {}
        # Shared with the scheduler thread, under _cond: what it should do next.
        self._cond = threading.Condition()
        self._arrivals: list[_Job] = []  # submitted, not admitted yet
        self._calls: list[_Call] = []  # work on the context, done between two steps
        self._jobs: list[_Job] = []  # admitted, by sequence id, until their consumer releases them
        self._in_flight: set[_Job] = set()  # in the step being decoded
        self._failure: BaseException | None = None
        self._closed = False
        self._calls_in_progress = 0  # calls into llama.cpp on callers' threads (see _call)
        self._longest_token: int | None = None  # in bytes, found when first needed
        # Counted for the server's /metrics (llama-server's n_decode_total and busy slots per
        # decode); only the decoding thread writes them.
        self.decodes = 0
        self.decoded_sequences = 0
        self.n_embd = int(llama.llama_model_n_embd_out(self._model))
        self._embedder: Embedder | None = None  # made at the first embed()
        self._embedding = threading.Lock()
        self._steps = 0  # decode steps taken, under _cond (an embedding waits for generations' steps)
        self._scheduler: threading.Thread | None = None
        if options.inline:
            self._warm_up()
        else:
            self._scheduler = threading.Thread(target=self._schedule, name="gemma-chat decode", daemon=True)
            self._scheduler.start()

    # -- loading ---------------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """The empty run that llama.cpp's tools make at load: the first decode pages in the weights
        and the compute buffers, and without it the user's first prompt pays for that (about 5% of
        a 2,000-token prompt here). Leaves no trace: the KV cache and the timers are reset. Runs on
        the thread that decodes (see _schedule): from any other, it costs the server a fifth of
        its tokens/s."""
        tokens = [token for token in (self.bos, self.eos) if token != llama.LLAMA_TOKEN_NULL] or [0]
        array = (llama.llama_token * len(tokens))(*tokens)
        self._follow_load()
        llama.llama_set_warmup(self._ctx, True)
        # As in llama.cpp, the status is not checked: a context that cannot decode fails on the
        # first real decode, with the error reported there.
        llama.llama_decode(self._ctx, llama.llama_batch_get_one(array, len(tokens)))
        llama.llama_memory_clear(self._memory, True)
        llama.llama_synchronize(self._ctx)
        llama.llama_perf_context_reset(self._ctx)
        llama.llama_set_warmup(self._ctx, False)

    @staticmethod
    def _load_model(path: Path, start: int, options: EngineOptions, extra_buffers: bool) -> llama.llama_model_p:
        params = llama.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        params.n_gpu_layers = -1 if options.n_gpu_layers >= ALL_LAYERS else options.n_gpu_layers
        if options.mmap:
            params.load_mode = llama.LLAMA_LOAD_MODE_MMAP_MLOCK if options.mlock else llama.LLAMA_LOAD_MODE_MMAP
        else:
            params.load_mode = llama.LLAMA_LOAD_MODE_MLOCK if options.mlock else llama.LLAMA_LOAD_MODE_NONE
        llama_log.clear_errors()
        if start:
            model = _load_at(path, start, params)
        else:
            model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            reason = llama_log.last_error() or "llama.cpp could not load it"
            raise UserError(f"cannot load model {path}: {reason}{_gpu_memory_hint(reason, options)}")
        return model

    def _new_context(self, options: EngineOptions) -> llama.llama_context_p:
        params = llama.llama_context_default_params()
        params.n_ctx = self.context_size_for(options.ctx_size)
        if options.ctx_size is not None and options.ctx_size > params.n_ctx > 0:
            # Said once, as llama.cpp does: a silent cut would look like -c was taken.
            warn(f"-c {options.ctx_size} is more than the model's training context; using {params.n_ctx}")
        params.n_batch = options.batch_size
        params.n_ubatch = options.ubatch_size
        params.n_seq_max = options.sequences
        params.n_threads = options.threads
        params.n_threads_batch = options.threads
        params.flash_attn_type = _FLASH_ATTN[options.flash_attn]
        # llama.cpp's own decode timers, the ones llama-completion reports: bench/ compares them.
        params.no_perf = False
        # llama.cpp's own default, which llama-cpp-python's differs from: a sliding-window cache of
        # window size (we check before rewinding into it).
        params.swa_full = False
        params.kv_unified = options.shared_kv and options.sequences > 1
        llama_log.clear_errors()
        ctx = llama.llama_init_from_model(self._model, params)
        if not ctx:
            llama.llama_model_free(self._model)
            reason = llama_log.last_error() or "out of memory?"
            raise UserError(f"cannot create a context of {params.n_ctx} tokens: {reason}"
                            f"{_gpu_memory_hint(reason, options)}")
        return ctx

    def context_size_for(self, requested: int | None) -> int:
        # As llamafile: 0, or more than the model was trained on, means the training context.
        if requested is None:
            return min(self.n_ctx_train, DEFAULT_CTX_CAP)
        if requested == 0 or requested > self.n_ctx_train:
            return self.n_ctx_train
        return requested

    def close(self) -> None:
        # Explicit, because llama_cpp's finalisers misbehave at interpreter shutdown (frozen builds
        # print "Exception ignored in Llama.__del__").
        with self._cond:
            if self._closed:
                return
            self._closed = True  # the scheduler stops at its next step
            self._cond.notify_all()
        if self._scheduler is not None:
            self._scheduler.join()
        with self._cond:
            self._failure = self._failure or EngineClosed("the model was closed")
            for job in self._jobs + self._arrivals:
                job.error, job.finish = self._failure, "error"
                _free_samplers(job)
            self._jobs.clear()
            self._arrivals.clear()
            self._cond.notify_all()
            # The one place that waits for every other call into llama.cpp (a server request
            # tokenizing, detokenizing or rendering a template): freeing the model under one of
            # them crashed the server on SIGTERM. Should one not end in time, the model is left to
            # the end of the process instead.
            if not self._cond.wait_for(lambda: not self._calls_in_progress, CLOSE_WAIT_SECONDS):
                return
        llama.llama_batch_free(self._batch)
        if self._embedder is not None:
            self._embedder.close()
        llama.llama_free(self._ctx)
        llama.llama_model_free(self._model)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decode_times(self) -> DecodeTimes:
        data = llama.llama_perf_context(self._ctx)
        return DecodeTimes(data.t_p_eval_ms, data.n_p_eval, data.t_eval_ms, data.n_eval, data.n_reused)

    @contextmanager
    def _call(self) -> Iterator[None]:
        """Around each call into llama.cpp from a caller's thread: close() waits for these to end
        before it frees the model, and refuses new ones."""
        with self._cond:
            if self._closed:
                raise EngineClosed("the model is being unloaded")
            self._calls_in_progress += 1
        try:
            yield
        finally:
            with self._cond:
                self._calls_in_progress -= 1
                self._cond.notify_all()

    # -- text and tokens -------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False,
                 limit: int | None = None) -> list[int]:
        """Tokens for `text`; special-token strings in it become tokens only when `special`.

        Text of more than `limit` tokens (default: the whole context) raises PromptTooLong, found
        before the text is tokenized whole: no text can make the tokenizer run for long.
        """
        limit = self.n_ctx if limit is None else limit
        data = text.encode("utf-8", errors="surrogatepass")
        # No token stands for more bytes than the longest one, so more bytes than the limit times
        # that cannot fit (the vocabulary is searched for its longest token only once text is
        # longer than `limit` bytes).
        if len(data) > limit and len(data) > limit * self.longest_token():
            raise PromptTooLong(f"the text is more than {limit} tokens, more than the context holds")
        if len(text) > COUNT_PIECE:
            self._refuse_if_too_long(text, special, limit)
        with self._call():
            tokens = self._tokenize(data, special, add_bos)
        if len(tokens) > limit:
            raise PromptTooLong(f"the text is {len(tokens)} tokens, more than the {limit} the context holds")
        return tokens

    def _refuse_if_too_long(self, text: str, special: bool, limit: int) -> None:
        """Count `text` a piece at a time, and raise PromptTooLong as soon as it cannot fit."""
        count = cuts = start = 0
        while start < len(text):
            end = _piece_end(text, start)
            with self._call():  # between pieces, close() gets its turn
                count += len(self._tokenize(text[start:end].encode("utf-8", errors="surrogatepass"), special, False))
            if count > limit + cuts * CUT_MARGIN:
                raise PromptTooLong(f"the text is more than {limit} tokens, more than the context holds")
            start, cuts = end, cuts + 1

    def _tokenize(self, data: bytes, special: bool, add_bos: bool) -> list[int]:
        capacity = len(data) + 2
        buffer = (llama.llama_token * capacity)()
        count = llama.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_bos, special)
        if count < 0:
            capacity = -count
            buffer = (llama.llama_token * capacity)()
            count = llama.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_bos, special)
        return list(buffer[:count])

    def longest_token(self) -> int:
        """The most bytes of text one token stands for."""
        if self._longest_token is None:
            with self._call():
                self._longest_token = max(
                    len(llama.llama_vocab_get_text(self._vocab, token))
                    for token in range(self.n_vocab))
        return self._longest_token

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing, as in llama.cpp)."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._token_bytes(token, special=False)
            self._pieces[token] = cached
        return cached

    def token_text(self, token: int) -> str:
        """A token as text with special tokens spelled out, for /dump and tests."""
        return self._token_bytes(token, special=True).decode("utf-8", errors="replace")

    def _token_bytes(self, token: int, *, special: bool) -> bytes:
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            with self._call():
                length = llama.llama_token_to_piece(self._vocab, token, buffer, size, 0, special)
            if length >= 0:
                return buffer.raw[:length]
            size = -length

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._vocab, token))

    def special_token(self, text: str) -> int | None:
        """The id of a control token spelled `text` (such as "<end_of_turn>"), else None."""
        tokens = self.tokenize(text, special=True)
        if len(tokens) == 1 and self._token_bytes(tokens[0], special=False) == b"":
            return tokens[0]
        return None

    def meta(self, key: str) -> str | None:
        size = 256
        while True:
            buffer = ctypes.create_string_buffer(size)
            with self._call():
                length = llama.llama_model_meta_val_str(self._model, key.encode(), buffer, size)
            if length < 0:
                return None
            if length < size:
                return buffer.value.decode("utf-8", errors="replace")
            size = length + 1

    # -- generation ------------------------------------------------------------------------------

    def new_sequence(self, seq_id: int = 0) -> Sequence:
        """Sequence `seq_id`, emptied. There is one Sequence object per id, so that its token list
        can never disagree with the KV cache behind it. Call it only while no generation runs on
        that sequence."""
        if not 0 <= seq_id < self.options.sequences:
            raise ValueError(f"sequence {seq_id} outside 0..{self.options.sequences - 1}")
        with self._cond:
            sequence = self._sequences.setdefault(seq_id, Sequence(seq_id))
        self._between_steps(lambda: self._empty(sequence))
        return sequence

    def _empty(self, sequence: Sequence) -> None:
        llama.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
        sequence.tokens.clear()

    def sequence_state(self, sequence: Sequence) -> tuple[list[int], bytes]:
        """The sequence's KV cache as llama.cpp serialises it, and the tokens it holds: saved, it
        lets a later process resume the conversation without evaluating it again. Call it only
        while no generation runs on that sequence."""
        def copy() -> tuple[list[int], bytes]:
            size = llama.llama_state_seq_get_size(self._ctx, sequence.seq_id)
            buffer = (ctypes.c_uint8 * size)()
            written = llama.llama_state_seq_get_data(self._ctx, buffer, size, sequence.seq_id)
            return list(sequence.tokens), memoryview(buffer)[:written].tobytes()

        return self._between_steps(copy)  # type: ignore[return-value]

    def restore_sequence(self, sequence: Sequence, tokens: list[int], state: bytes) -> bool:
        """Put back a KV cache saved by sequence_state; False (and the sequence empty) when this
        context cannot take it (another llama.cpp, another cache layout, too few cells)."""
        def load() -> bool:
            self._empty(sequence)
            if not tokens or len(tokens) >= self.n_ctx_seq:
                return False
            buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            read = llama.llama_state_seq_set_data(self._ctx, buffer, len(state), sequence.seq_id)
            # The cache must end where the token list does, or the two would disagree.
            if read == 0 or llama.llama_memory_seq_pos_max(self._memory, sequence.seq_id) != len(tokens) - 1:
                self._empty(sequence)
                return False
            sequence.tokens.extend(tokens)
            return True

        return bool(self._between_steps(load))

    def embed(self, tokens: list[int], normalize: bool = True,
              cancelled: Callable[[], bool] | None = None) -> list[float] | None:
        """The model's embedding of `tokens` (1 to n_ctx_seq of them), pooled and, if `normalize`,
        of unit length (gemmachat/embeddings.py); None once `cancelled()` says so, checked between
        chunks. Each chunk of the input is one call between two decode steps, so running
        generations go on between chunks."""
        if not 0 < len(tokens) <= self.n_ctx_seq:
            raise ValueError(f"{len(tokens)} tokens to embed, in a context of {self.n_ctx_seq}")
        with self._embedding:  # the embeddings context holds one input at a time
            if self._embedder is None:
                named = self.meta(f"{self.info.architecture}.pooling_type")
                pooling = int(named) if named and named.isdecimal() else None
                self._embedder = self._between_steps(lambda: Embedder(
                    self._model, self.n_ctx_seq, self.threads, _FLASH_ATTN[self.options.flash_attn], pooling))
            embedder: Embedder = self._embedder  # type: ignore[assignment]
            self._between_steps(embedder.start)
            for start in range(0, len(tokens), embedder.chunk):
                if self._closed:  # stopping: the server answers 503, not a failed decoding thread
                    raise EngineClosed("the model is being unloaded")
                if cancelled is not None and cancelled():
                    return None
                self._between_steps(lambda start=start: embedder.feed(tokens[start:start + embedder.chunk]))
                self._let_generations_run(EMBEDDING_YIELD_STEPS)
            return embedder.result(normalize)

    def _let_generations_run(self, steps: int) -> None:
        """Wait while running generations take up to `steps` decode steps (see EMBEDDING_YIELD_STEPS)."""
        with self._cond:
            target = self._steps + steps
            while self._steps < target and not self._closed and any(not job.finish for job in self._jobs):
                self._check_scheduler()
                if not self._cond.wait(1.0):
                    return  # no step for a second: nothing is generating after all

    def state_fingerprint(self) -> str:
        """What a saved KV cache depends on: the model file, llama.cpp's version and the settings
        that shape the cache. A saved state is restored only into an engine with the same."""
        stat = self.path.stat()
        return "|".join(str(part) for part in (
            self.name, self.path.resolve(), stat.st_size, stat.st_mtime_ns, self.info.start,
            _library_identity(), self.n_ctx_seq, self.options.flash_attn,
        ))

    def _between_steps(self, work: Callable[[], object]) -> object:
        """Run `work` on the thread that decodes, between two steps (only that thread may use the
        context), and return what it returns."""
        call = _Call(work)
        with self._cond:
            self._check_scheduler()
            self._calls.append(call)
            self._cond.notify_all()
            if self._scheduler is None:
                self._tidy()
            while not call.done:
                self._check_scheduler()
                self._cond.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def generate(
        self,
        sequence: Sequence,
        prompt: list[int],
        sampling: Sampling,
        *,
        max_tokens: int = -1,
        stop: tuple[str, ...] = (),
        ignore_eos: bool = False,
        cancelled: Callable[[], bool] | None = None,
        top_logprobs: int | None = None,
    ) -> Generation:
        """Start evaluating `prompt` on `sequence` (reusing its common prefix); iterate the result
        for the reply. With `top_logprobs` (0 to 20), the Generation's `logprobs` get each token's
        log-probability and that many alternatives, as the tokens are read.

        Generations on different sequences may run at once, from any threads: they share each
        llama_decode (see _schedule). Raises PromptTooLong at once if the prompt leaves no room
        for a reply.
        """
        if not prompt:
            raise UserError("the prompt is empty")
        if len(prompt) >= self.n_ctx_seq:
            raise PromptTooLong(
                f"the prompt is {len(prompt)} tokens, but the context holds {self.n_ctx_seq} "
                "(raise -c, or shorten the prompt)"
            )
        history = prompt[-sampling.repeat_last_n:] if sampling.repeat_last_n > 0 else []
        with self._call():
            grammar = self._grammar(sampling.grammar) if sampling.grammar else None
            job = _Job(sequence, self._sampler_chain(sampling, ignore_eos, history), grammar, max_tokens, ignore_eos,
                       cancelled, pending=list(prompt), top_logprobs=top_logprobs)
        stats = Stats(prompt_tokens=len(prompt))
        tokens: list[int] = []
        logprobs: list[TokenLogprob] = []
        with self._cond:
            self._check_scheduler()
            self._arrivals.append(job)
            self._cond.notify_all()
        pieces = self._read(job, stop, stats, tokens, logprobs, time.perf_counter())
        # A generation dropped before it was read still has to leave the scheduler.
        weakref.finalize(pieces, self._release, job)
        return Generation(pieces, stats, tokens, logprobs)

    def _read(self, job: _Job, stop: tuple[str, ...], stats: Stats, generated: list[int],
              logprobs: list[TokenLogprob], started: float) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop_guard = StopGuard(stop)
        try:
            while True:
                token = self._next_token(job)
                stats.reused_tokens = job.reused
                if token is None:
                    stats.finish_reason = job.finish
                    break
                if not stats.prompt_seconds:
                    stats.prompt_seconds = job.first_token_at - started
                generated.append(token)
                if job.top_logprobs is not None:
                    with self._cond:
                        logprobs.append(job.out_logprobs.popleft())
                stats.generated_tokens += 1
                text, stopped = stop_guard.feed(decoder.decode(self.piece(token)))
                if text:
                    yield text
                if stopped:
                    stats.finish_reason = "stop"
                    return
            # What the stop guard held back (a possible start of a stop string) and an incomplete
            # UTF-8 tail belong to the reply once it is over.
            tail, _ = stop_guard.feed(decoder.decode(b"", final=True), final=True)
            if tail:
                yield tail
        finally:
            if job.first_token_at:
                stats.prompt_seconds = job.first_token_at - started
                if stats.generated_tokens:
                    stats.generation_seconds = time.perf_counter() - job.first_token_at
            self._release(job)

    def _next_token(self, job: _Job) -> int | None:
        """The job's next sampled token, waiting for the scheduler (or, inline, decoding it); None
        once the job has ended."""
        while True:
            with self._cond:
                if job.out:
                    return job.out.popleft()
                if job.finish:
                    if job.error is not None:
                        raise job.error
                    return None
                self._check_scheduler()
                if self._scheduler is not None:
                    self._cond.wait()
                    continue
            self._step(wait=False)

    def _release(self, job: _Job) -> None:
        """The consumer is done with the job: out of the running set, its sampler freed, at once
        unless the scheduler is using it in the step under way (then it does so after)."""
        with self._cond:
            if job.released:
                return
            job.released = True
            if job not in self._in_flight:
                self._drop(job)
            self._cond.notify_all()

    def _drop(self, job: _Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
        elif job in self._arrivals:
            self._arrivals.remove(job)
        else:
            return  # already dropped, or the engine is closed
        _free_samplers(job)

    def _check_scheduler(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the decoding thread stopped: {self._failure}") from self._failure

    # -- the scheduler ---------------------------------------------------------------------------
    #
    # One thread, started with the engine, makes every call into the llama.cpp context. Each step
    # is one llama_decode for every running generation (the last sampled token of each), with new
    # prompts chunked in beside them; consumers on any thread read the tokens it samples.
    #
    # Why one thread: ggml's CPU backend runs each decode on an OpenMP team that belongs to the
    # calling thread. Decodes called from several threads (one per server request) created one
    # team each, and once libgomp manages more threads than there are cores it stops spinning
    # between barriers and sleeps instead: 4 clients got 76-84 tokens/s instead of 108-110.

    def _schedule(self) -> None:
        try:
            self._warm_up()
            while self._step():
                pass
        except BaseException as error:  # noqa: BLE001 - a bug here must not leave consumers waiting
            with self._cond:
                self._failure = error
                for job in self._jobs + self._arrivals:
                    job.error, job.finish = error, "error"
                self._cond.notify_all()

    def _step(self, wait: bool = True) -> bool:
        """Wait for work (unless not `wait`), then decode one step and sample; False once the engine
        closes or, not waiting, when there is nothing to do."""
        with self._cond:
            while True:
                if self._closed:
                    return False
                self._tidy()
                parts = self._plan()
                if parts:
                    break
                if not wait:
                    return False
                self._cond.wait()
            self._in_flight = {job for job, _ in parts}
        # Outside the lock, so that consumers read their tokens meanwhile: only this thread touches
        # the context, and a sampler in flight is freed only after the step.
        status = self._decode(parts)
        if status == 1 and len(parts) > 1:
            # The shared KV pool is full: find out whose tokens do not fit, one job at a time.
            results = []
            for part in parts:
                alone = self._decode([part])
                results.append(([part], alone, self._sample([part]) if alone == 0 else {}))
        else:
            results = [(parts, status, self._sample(parts) if status == 0 else {})]
        with self._cond:
            for served, outcome, sampled in results:
                self._finish_decode(served, outcome, sampled)
            for job in self._in_flight:
                if job.released:
                    self._drop(job)
            self._in_flight = set()
            self._steps += 1
            self._cond.notify_all()
        return True

    def _tidy(self) -> None:
        """Do the work asked of the context, then admit new jobs (with the lock held)."""
        if self._calls:
            for call in self._calls:
                try:
                    call.result = call.work()
                except Exception as error:  # noqa: BLE001 - it belongs to the caller, who re-raises it
                    call.error = error
                call.done = True
            self._calls.clear()
            self._cond.notify_all()
        if self._arrivals:
            for job in self._arrivals:
                job.reused = self._admit(job)
                self._jobs.append(job)
            self._arrivals.clear()
            # Sequences in ascending order: with one KV stream per sequence, llama.cpp groups
            # consecutive sequence ids into one ubatch.
            self._jobs.sort(key=lambda job: job.sequence.seq_id)

    def _admit(self, job: _Job) -> int:
        """Cut the KV cache of the job's sequence back to what it shares with the prompt, and leave
        the rest of the prompt pending; returns the tokens reused."""
        sequence, prompt = job.sequence, job.pending
        keep = common_prefix(sequence.tokens, prompt)
        keep = min(keep, len(prompt) - 1)  # the last prompt token is evaluated for its logits
        if keep < len(sequence.tokens) and not self._can_rewind_to(sequence, keep):
            keep = 0
        if not llama.llama_memory_seq_rm(self._memory, sequence.seq_id, keep, -1):
            keep = 0
            llama.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
        del sequence.tokens[keep:]
        del job.pending[:keep]
        return keep

    def _can_rewind_to(self, sequence: Sequence, position: int) -> bool:
        # A sliding-window cache keeps only the last window of positions: after cutting back to
        # `position`, the window before it must still be there, or we evaluate from scratch.
        if position == 0 or self.n_swa <= 0:
            return True
        oldest = llama.llama_memory_seq_pos_min(self._memory, sequence.seq_id)
        return oldest <= max(0, position - self.n_swa)

    def _plan(self) -> list[tuple[_Job, list[int]]]:
        """What the next decode carries: the last sampled token of each generating job, then prompt
        tokens of the others (with the lock held)."""
        parts: list[tuple[_Job, list[int]]] = []
        for job in self._jobs:
            if job.finish or job.next_token is None:
                continue
            if job.cancelled is not None and job.cancelled():
                job.finish = "cancelled"
                self._cond.notify_all()  # its reader may be waiting already: nothing more will come
            else:
                parts.append((job, [job.next_token]))
        # A prompt next to running generations goes in chunks, so that a long one delays their
        # next token by a chunk's worth of work, not by the whole prompt.
        # On the scheduler thread (the chat, the server), at most one ubatch per step, which is what
        # llama.cpp computes at a time anyway: a cancelled job (a client gone, the server stopping)
        # then ends within one ubatch, not after a whole batch of prompts (4 s on a busy 2-core
        # machine, past the shutdown time). Inline (--cli), the whole batch, as llama-completion.
        room = (self.n_batch if self._scheduler is None else self.n_ubatch) - len(parts)
        if parts:
            room = min(room, PROMPT_CHUNK)
        for job in self._jobs:
            if job.pending and not job.finish and room > 0:
                # A prompt is cancellable between chunks too: the server's shutdown must not wait
                # for a long prompt to be evaluated.
                if job.cancelled is not None and job.cancelled():
                    job.finish = "cancelled"
                    self._cond.notify_all()
                    continue
                parts.append((job, job.pending[:room]))
                room -= len(parts[-1][1])
        parts.sort(key=lambda part: part[0].sequence.seq_id)
        return parts

    @staticmethod
    def _wants_logits(job: _Job, tokens: list[int]) -> bool:
        # Logits only where a token gets sampled: after a job's last prompt token, or its generated one.
        return job.next_token is not None or len(tokens) == len(job.pending)

    def _decode(self, parts: list[tuple[_Job, list[int]]]) -> int:
        batch = self._batch
        index = 0
        for job, tokens in parts:
            position = len(job.sequence.tokens)
            for offset, token in enumerate(tokens):
                batch.token[index] = token
                batch.pos[index] = position + offset
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = job.sequence.seq_id
                batch.logits[index] = 0
                index += 1
            if self._wants_logits(job, tokens):
                batch.logits[index - 1] = 1
        batch.n_tokens = index
        self._follow_load()
        self.decodes += 1
        self.decoded_sequences += len(parts)
        return llama.llama_decode(self._ctx, batch)

    def _follow_load(self) -> None:
        """As many threads for the next decode as other processes leave CPUs (gemmachat/threads.py)."""
        if self._governor is not None and self._governor.threads() != self.threads:
            self.threads = self._governor.current
            llama.llama_set_n_threads(self._ctx, self.threads, self.threads)

    def _sample(self, parts: list[tuple[_Job, list[int]]]) -> dict[_Job, int]:
        sampled: dict[_Job, int] = {}
        index = 0
        for job, tokens in parts:
            index += len(tokens)
            if self._wants_logits(job, tokens):
                if job.grammar is None:
                    sampled[job] = llama.llama_sampler_sample(job.sampler, self._ctx, index - 1)
                else:
                    sampled[job] = self._sample_with_grammar(job, index - 1)
                if job.top_logprobs is not None:
                    logprob, top = _logits.top(self._logits_at(index - 1), self.n_vocab, sampled[job],
                                               job.top_logprobs)
                    job.sampled_logprob = TokenLogprob(sampled[job], logprob, tuple(top))
        return sampled

    def _finish_decode(self, parts: list[tuple[_Job, list[int]]], status: int, sampled: dict[_Job, int]) -> None:
        """Record what a decode did for each job, and hand out the tokens sampled (lock held)."""
        if status != 0:
            error: Exception = (PromptTooLong(f"the context of {self.n_ctx} tokens is full") if status == 1
                                else RuntimeError(f"llama_decode failed with status {status}"))
            for job, _ in parts:
                job.error, job.finish = error, "error"
            return
        for job, tokens in parts:
            job.sequence.tokens.extend(tokens)
            if job.next_token is None:
                del job.pending[:len(tokens)]
                if job.pending:
                    continue
                job.first_token_at = time.perf_counter()
            self._take(job, sampled[job])

    def _take(self, job: _Job, token: int) -> None:
        job.next_token = None
        if job.max_tokens == 0:  # -n 0, as llama.cpp's: the prompt is evaluated, nothing generated
            job.finish = "length"
            return
        if not job.ignore_eos and self.is_end_of_generation(token):
            job.finish = "stop"
            return
        job.out.append(token)
        if job.sampled_logprob is not None:
            job.out_logprobs.append(job.sampled_logprob)
        job.sampled += 1
        if job.sampled == job.max_tokens or len(job.sequence.tokens) + 1 >= self.n_ctx_seq:
            job.finish = "length"
        else:
            job.next_token = token  # decoded at the next step

    def _sampler_chain(self, sampling: Sampling, ignore_eos: bool, history: list[int]) -> llama.llama_sampler_p:
        # The same chain, in the same order, as llama.cpp's common_sampler with default settings,
        # so that a seeded or greedy run gives llama-completion's tokens.
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        # User biases first, then llama.cpp's own: suppressed tokens, and with --ignore-eos every
        # end-of-generation token, so that it is never sampled (as llama.cpp does).
        biases = list(sampling.logit_bias) + [
            (token, float("-inf")) for token in self._suppressed_tokens() + (self._eog() if ignore_eos else [])
        ]
        if biases:
            array = (llama.llama_logit_bias * len(biases))(
                *[llama.llama_logit_bias(token, bias) for token, bias in biases]
            )
            llama.llama_sampler_chain_add(
                chain, llama.llama_sampler_init_logit_bias(self.n_vocab, len(biases), array)
            )
        add = lambda sampler: llama.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        penalties = llama.llama_sampler_init_penalties(
            self.n_vocab, sampling.repeat_last_n, sampling.repeat_penalty,
            sampling.frequency_penalty, sampling.presence_penalty,
        )
        # The prompt's last tokens count for the penalties (as llama.cpp's common_sampler); only
        # the penalties sampler sees them: the grammar describes the reply, not the prompt.
        for token in history:
            llama.llama_sampler_accept(penalties, token)
        add(penalties)
        add(llama.llama_sampler_init_top_k(sampling.top_k))
        add(llama.llama_sampler_init_top_p(sampling.top_p, 0))
        add(llama.llama_sampler_init_min_p(sampling.min_p, 0))
        add(llama.llama_sampler_init_temp_ext(sampling.temperature, 0.0, 1.0))
        add(llama.llama_sampler_init_dist(sampling.seed))
        return chain

    def _grammar(self, grammar: str) -> llama.llama_sampler_p:
        with llama_log.c_stderr_captured() as printed:
            sampler = llama.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            # "parse: error parsing grammar: expecting ::= at REST OF THE GRAMMAR", then the grammar
            _, found, reason = printed().partition("error parsing grammar: ")
            reason = reason.splitlines()[0].strip() if found else llama_log.last_error() or "it does not parse"
            raise UserError(f"llama.cpp refused the grammar: {reason}")
        return sampler

    def _sample_with_grammar(self, job: _Job, index: int) -> int:
        """A token the grammar allows, chosen as llama.cpp's common_sampler chooses it: the chain
        samples from all the logits, and only if the grammar refuses that one token is it applied
        to every candidate before the chain samples again. Checking the whole vocabulary against
        the grammar at every step (262,144 tokens for Gemma) made structured output 10-30 times
        slower than plain generation."""
        candidates = self._candidates(index)
        llama.llama_sampler_apply(job.sampler, ctypes.byref(candidates))
        token = candidates.data[candidates.selected].id
        single = llama.llama_token_data(token, 1.0, 0.0)
        check = llama.llama_token_data_array(ctypes.pointer(single), 1, -1, False)
        llama.llama_sampler_apply(job.grammar, ctypes.byref(check))
        if single.logit == float("-inf"):
            candidates = self._candidates(index)
            llama.llama_sampler_apply(job.grammar, ctypes.byref(candidates))
            llama.llama_sampler_apply(job.sampler, ctypes.byref(candidates))
            token = candidates.data[candidates.selected].id
        # llama_sampler_sample accepts the token into the chain itself; here it is done by hand.
        llama.llama_sampler_accept(job.grammar, token)
        llama.llama_sampler_accept(job.sampler, token)
        return token

    def _candidates(self, index: int) -> llama.llama_token_data_array:
        """Every token with its logit at batch position `index` (common_sampler's set_logits)."""
        if self._candidate_data is None:
            self._candidate_data = (llama.llama_token_data * self.n_vocab)()
        _logits.candidates(self._logits_at(index), self.n_vocab, ctypes.addressof(self._candidate_data))
        return llama.llama_token_data_array(self._candidate_data, self.n_vocab, -1, False)

    def _logits_at(self, index: int) -> int:
        """The address of the logits at batch position `index` (0 if llama.cpp has none there)."""
        return ctypes.cast(llama.llama_get_logits_ith(self._ctx, index), ctypes.c_void_p).value or 0

    def _suppressed_tokens(self) -> list[int]:
        count = ctypes.c_int32(0)
        pointer = llama.llama_vocab_get_suppress_tokens(self._vocab, ctypes.byref(count))
        return [pointer[i] for i in range(count.value)] if pointer else []

    def _eog(self) -> list[int]:
        if self._eog_tokens is None:
            self._eog_tokens = [
                token for token in range(self.n_vocab)
                if llama.llama_vocab_is_eog(self._vocab, token)
            ]
        return self._eog_tokens


def _free_samplers(job: _Job) -> None:
    llama.llama_sampler_free(job.sampler)
    if job.grammar is not None:
        llama.llama_sampler_free(job.grammar)


def _piece_end(text: str, start: int) -> int:
    """Where a piece of `text` counted from `start` ends: COUNT_PIECE characters on, or before
    the last space that follows a word in the second half of that."""
    end = start + COUNT_PIECE
    if end >= len(text):
        return len(text)
    last = None
    for last in _CUT_BEFORE.finditer(text, start + COUNT_PIECE // 2, end):
        pass
    return last.start() if last else end


def _gpu_memory_hint(reason: str, options: EngineOptions) -> str:
    """What to try when llama.cpp could not allocate with layers on a GPU (CUDA's "out of memory",
    llama.cpp's "unable to allocate CUDA0 buffer"): fewer layers there, or a smaller context."""
    if options.n_gpu_layers > 0 and any(words in reason.lower() for words in
                                        ("out of memory", "unable to allocate", "failed to allocate")):
        return " (the GPU is out of memory: try a smaller -ngl, or a smaller -c)"
    return ""


def common_prefix(a: list[int], b: list[int]) -> int:
    length = min(len(a), len(b))
    for index in range(length):
        if a[index] != b[index]:
            return index
    return length


class StopGuard:
    """Finds stop strings in streamed text without rescanning the whole reply.

    Text that might be the start of a stop string is held back until the next piece settles it,
    so a stop string never reaches the user even when it spans several tokens.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to show, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        window = self.held + text
        cut = min((i for i in (window.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return window[:cut], True
        if final:
            self.held = ""
            return window, False
        keep = max((self._partial_suffix(window, s) for s in self.stops), default=0)
        self.held = window[len(window) - keep:] if keep else ""
        return window[:len(window) - keep], False

    @staticmethod
    def _partial_suffix(text: str, stop: str) -> int:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-length:]):
                return length
        return 0


def default_reply_limit(engine: Engine, n_predict: int) -> int:
    """The token limit of a reply that names none: -n, else the cap for a base model, else -1 (to
    the end of the turn, or of the context)."""
    if n_predict < 0 and not engine.info.chat_template:
        return BASE_MODEL_REPLY_CAP
    return n_predict


def renderer_for(engine: Engine, settings: Settings, template: Template) -> Renderer:
    """The prompt renderer the settings ask for, bound to this model's tokens and template. Ours
    is a Gemma template: another family's instruct model speaks through its own (sandboxed)
    unless --template names one."""
    foreign = (engine.info.chat_template is not None and settings.template == "gemma"
               and not (engine.info.architecture or "").startswith("gemma"))
    return make_renderer(template, settings.jinja or foreign, engine.info.chat_template,
                         bos_token=engine.token_text(engine.bos), eos_token=engine.token_text(engine.eos),
                         warn=warn)


def load_engine(settings: Settings, sequences: int = 1, shared_kv: bool = True, inline: bool = False,
                model: ModelFile | None = None) -> Engine:
    """Load the model the settings name (resolved and validated here unless `model` already is),
    quietly unless --verbose."""
    from gemmachat.model_path import resolve_model

    llama_log.install(settings.verbose)
    path, info, name = model or resolve_model(settings.model, settings.environ, hf_repo=settings.hf_repo,
                                              hf_file=settings.hf_file)
    if settings.rpc:
        from gemmachat import rpc

        rpc.connect(settings.rpc)
        if settings.n_gpu_layers == 0:
            # As in llama.cpp: the workers hold only the layers that -ngl sends off the CPU.
            warn("--rpc with -ngl 0 leaves every layer here: add -ngl 999 to put them on the workers")
    elif settings.n_gpu_layers > 0 and not gpu_offload_supported():
        warn(no_gpu_message(settings.verbose))
    options = EngineOptions.from_settings(settings, sequences, shared_kv, inline)
    cpus = usable_cpus()
    before = None if options.adapt_threads else read_cpu_times(cpus)
    engine = Engine(path, info, options, name)
    if before is not None and (notice := fixed_threads_notice(before, read_cpu_times(cpus), options.threads,
                                                              len(cpus))):
        warn(notice)
    if settings.verbose and not engine.repack.use_extra_buffers:
        warn(f"weights stay in plain CPU buffers (no repacking): {engine.repack.reason}")
    return engine

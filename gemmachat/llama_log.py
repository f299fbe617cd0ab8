"""Routes llama.cpp's log through us: silent by default, on stderr with --verbose.

llama-cpp-python's own callback still prints some lines with verbose=False, so we replace it.
The last error lines are kept either way, because when llama.cpp refuses a model the reason is
only in its log (an unknown architecture, a tensor out of bounds), and the user deserves it.

llama.cpp's last words go through here too: a GGML_ASSERT (reachable from a hostile model file)
calls abort(), which would print a C backtrace and kill us with SIGABRT. Our hook prints one line
and ends the process with status 2 instead; nothing can be resumed after a failed assertion.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from gemmachat import backends
from gemmachat.bindings import libggml, llama_cpp

# ggml.h's levels (llama_cpp/_logger.py still lists an older order).
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5

_state = {"verbose": False, "last_level": 0}
_recent_errors: collections.deque[str] = collections.deque(maxlen=8)
# Aborts that are not internal checks but something the user can act on (a lost RPC worker,
# gemmachat/rpc.py): each explainer turns llama.cpp's message into our line, or passes with None.
_explainers: list[Callable[[str], str | None]] = []


@llama_cpp.llama_log_callback
def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == GGML_LOG_LEVEL_CONT:
        level = _state["last_level"]
    _state["last_level"] = level
    message = text.decode("utf-8", errors="replace") if text else ""
    if level == GGML_LOG_LEVEL_ERROR and message.strip():
        _recent_errors.append(message.strip())
    elif "backend from" in message:
        backends.note_log_line(message)
    if _state["verbose"]:
        sys.stderr.write(message)
        sys.stderr.flush()


@ctypes.CFUNCTYPE(None, ctypes.c_char_p)
def _on_abort(message: bytes) -> None:
    text = message.decode("utf-8", errors="replace") if message else "unknown error"
    # "/long/build/path/llama-model.cpp:1328: GGML_ASSERT(...) failed": the file and line stay
    # (they identify the check), the build folder goes.
    where, colon, what = text.partition(": ")
    text = " ".join((os.path.basename(where) + colon + what).split())
    explained = next(filter(None, (explain(" ".join(what.split())) for explain in _explainers)), None)
    try:
        sys.stdout.flush()  # what was generated before stays
    except (OSError, ValueError):
        pass
    if explained:
        # On a line of its own: a worker is lost in the middle of a streamed reply.
        os.write(2, f"\ngemma-chat: {explained}\n".encode(errors="replace"))
        os._exit(1)
    os.write(2, f"gemma-chat: llama.cpp stopped on an internal check: {text}\n".encode())
    os._exit(2)


def explain_aborts(explainer: Callable[[str], str | None]) -> None:
    """From here on, an abort whose message `explainer` recognises ends the process with its line
    and status 1 (a failure outside the program, not a broken check)."""
    _explainers.append(explainer)


libggml.ggml_set_abort_callback.argtypes = [type(_on_abort)]
libggml.ggml_set_abort_callback.restype = ctypes.c_void_p


def install(verbose: bool) -> None:
    _state["verbose"] = verbose
    callback, user_data = (_on_log, None) if verbose else _quiet()
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(user_data))
    libggml.ggml_set_abort_callback(_on_abort)


def _quiet() -> tuple[ctypes._CFuncPtr, int | None]:
    """A C callback that drops llama.cpp's debug lines without taking the GIL and hands the others
    to _on_log, whose address is its user data (gemmachat/_quiet_log.c says why)."""
    try:
        from gemmachat import _quiet_log
    except ImportError:  # a source tree never installed: every line goes through Python
        return _on_log, None
    return llama_cpp.llama_log_callback(_quiet_log.CALLBACK), ctypes.cast(_on_log, ctypes.c_void_p).value


def last_error() -> str | None:
    """The cause llama.cpp gave for its last failure, without its function-name prefix."""
    for line in reversed(_recent_errors):
        # Its last line is often a generic "failed to load model"; the cause is logged before.
        if "failed to load model" in line:
            continue
        _, _, cause = line.rpartition("error loading model: ")
        return cause or line.partition(": ")[2] or line
    return None


def clear_errors() -> None:
    _recent_errors.clear()


_c_stderr_lock = threading.Lock()


@contextmanager
def c_stderr_captured() -> Iterator[Callable[[], str]]:
    """What C code writes to stdio's `stderr` while the block runs, kept instead of printed; the
    function yielded returns it once the block is over. llama.cpp's grammar parser reports with a
    bare fprintf there, around our one line, and echoes the grammar a client sent, escapes and all.
    Only the FILE pointer is swapped, not file descriptor 2: Python's own writes (the server's
    log) still reach the terminal; what another thread's C code writes there in that instant is
    kept with it. Only on glibc and macOS, whose `stderr` is a variable (musl's is constant);
    elsewhere nothing is kept and llama.cpp prints as it does."""
    captured = {"text": ""}
    found = _c_stderr()
    if found is None:
        yield lambda: captured["text"]
        return
    libc, pointer = found
    buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
    with _c_stderr_lock:  # two swaps at once could leave stderr on a closed stream
        stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
        if not stream:
            yield lambda: captured["text"]
            return
        saved, pointer.value = pointer.value, stream
        try:
            yield lambda: captured["text"]
        finally:
            pointer.value = saved
            libc.fclose(stream)
            captured["text"] = ctypes.string_at(buffer.value, size.value).decode("utf-8", "replace")
            libc.free(buffer)


@functools.cache
def _c_stderr() -> tuple[ctypes.CDLL, ctypes.c_void_p] | None:
    """The C library, set up for c_stderr_captured, and its `stderr` variable; looked up once."""
    if not (_glibc() or sys.platform == "darwin"):
        return None
    libc = ctypes.CDLL(None)
    pointer = next((found for found in (_symbol(libc, name) for name in ("stderr", "__stderrp")) if found), None)
    if pointer is None or not hasattr(libc, "open_memstream"):
        return None
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    libc.fclose.argtypes = libc.free.argtypes = [ctypes.c_void_p]
    return libc, pointer


def _glibc() -> bool:
    try:  # not platform.libc_ver(): it reads the whole executable, the single file's weights included
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):
        return False


def _symbol(library: ctypes.CDLL, name: str) -> ctypes.c_void_p | None:
    try:
        return ctypes.c_void_p.in_dll(library, name)
    except ValueError:
        return None

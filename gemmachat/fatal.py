"""A crash inside llama.cpp ends with one line that names it and says what to try, in every mode,
piped or not, instead of a bare "Illegal instruction" from the shell or nothing at all. And ctrl-c
during start-up leaves at once, with status 130.

The handlers themselves are C (gemmachat/_fatal.c says why); this module holds the words.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator

MESSAGES = {
    "SIGILL": "llama.cpp used an instruction this CPU does not have (SIGILL). Try --no-repack; if it "
              "still crashes, reinstall llama-cpp-python built on this machine (README: Troubleshooting)",
    "SIGSEGV": "llama.cpp crashed (SIGSEGV, invalid memory access). Try --no-repack, --no-mmap or a "
               "smaller -c; if it persists, run it again with --verbose and report it (README: Troubleshooting)",
    "SIGBUS": "the model file failed while mapped (SIGBUS): it was changed or truncated, or its disk "
              "failed. Leave the GGUF alone while gemma-chat runs, or use --no-mmap",
    "SIGFPE": "llama.cpp hit an arithmetic fault (SIGFPE); run it again with --verbose and report it "
              "(README: Troubleshooting)",
}
INTERRUPTED = 130  # what a shell reports for a process that ctrl-c ended (128 + SIGINT)

_state = {"quick_exit": False}


def install() -> None:
    """From here on, each of these signals prints its line before the process ends by it."""
    try:
        from gemmachat import _fatal
    except ImportError:  # a source tree never installed: only the plain signal then
        return
    for name, message in MESSAGES.items():
        number = getattr(signal, name, None)  # Windows has no SIGBUS
        if number is not None:
            # On a line of its own: the crash may come in the middle of a streamed reply.
            _fatal.install(int(number), f"\ngemma-chat: {message}\n".encode())


def exit_on_interrupt() -> None:
    """Until interrupts_to_python(), ctrl-c ends the process at once with status 130.

    For start-up only: nothing that start-up writes can be left torn by it (files are replaced
    whole, and the model's copy into the cache runs under python_interrupts()).
    """
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # ignored, as in a background job of a shell without job control: it stays so
    try:
        from gemmachat import _fatal
    except ImportError:
        return
    # The shell's prompt on a line of its own, and the cursor back if the loading spinner hid it.
    message = "\n" + ("\x1b[?25h" if sys.stderr.isatty() else "")
    _fatal.exit_on(int(signal.SIGINT), INTERRUPTED, message.encode())
    _state["quick_exit"] = True


def interrupts_to_python() -> None:
    """Start-up is over: ctrl-c raises KeyboardInterrupt again, for the mode to handle."""
    if _state["quick_exit"]:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _state["quick_exit"] = False


@contextmanager
def python_interrupts() -> Iterator[None]:
    """ctrl-c as a KeyboardInterrupt for a while, so that `finally` blocks clean up after it."""
    quick = _state["quick_exit"]
    interrupts_to_python()
    try:
        yield
    finally:
        if quick:
            exit_on_interrupt()

"""A crash inside llama.cpp ends with one line that names it and says what to try, in every mode,
piped or not, instead of a bare "Illegal instruction" from the shell or nothing at all.

The handler itself is C (gemmachat/_fatal.c says why); this module holds the words.
"""

from __future__ import annotations

import signal

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

"""The `gemma-chat` command: parse the settings, run the mode, turn user errors into one line."""

from __future__ import annotations

import os
import signal
import sys
from typing import Sequence

from gemmachat import cache, fatal
from gemmachat.errors import UserError, report
from gemmachat.settings import Settings, parse_settings


def run(settings: Settings) -> int:
    if settings.mode == "cache-info":
        return cache.print_cache_info(settings.environ)
    if settings.mode == "list-models":
        from gemmachat import hub
        from gemmachat.model_path import cache_dir

        return hub.print_model_list(cache_dir(settings.environ))
    if settings.mode == "cli":
        from gemmachat import oneshot

        return oneshot.run(settings)
    if settings.mode == "server":
        from gemmachat import server

        return server.serve(settings)
    if settings.mode == "rpc-worker":
        from gemmachat import rpc
        from gemmachat.settings import default_threads

        return rpc.serve(settings.host, settings.port, settings.threads or default_threads(), settings.verbose)
    from gemmachat import chat

    return chat.run_chat(settings)


def _interrupted(signum: int, frame: object) -> None:
    # SIGTERM ends the CLI and the chat as ctrl-c does: through KeyboardInterrupt, so every
    # `with` and `finally` on the way out runs (the model is freed, no file is left half-written).
    # The server replaces this with its own graceful shutdown.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    fatal.install()
    # Each mode hands ctrl-c back to Python once it has started (fatal.interrupts_to_python).
    fatal.exit_on_interrupt()
    signal.signal(signal.SIGTERM, _interrupted)
    cache.clean_in_background(os.environ)
    try:
        return run(parse_settings(sys.argv[1:] if argv is None else argv))
    except UserError as error:
        return report(error)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`gemma-chat --cli ... | head`): nothing left to say to anyone.
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

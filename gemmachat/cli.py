"""The `gemma-chat` command: parse the settings, run the mode, turn user errors into one line."""

from __future__ import annotations

import io
import os
import signal
import sys
from typing import Any, Sequence

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
    caller_stdout = sys.stdout
    try:
        if sys.stdout is not None:
            _guard_stdout()
        try:
            settings = parse_settings(sys.argv[1:] if argv is None else argv)
        except SystemExit:  # --help or --version printed, or a usage error
            _flush_stdout()
            raise
        if sys.stdout is None and settings.mode != "server":  # started with `>&-`
            raise UserError("standard output is closed: there is nowhere to write the output "
                            "(>/dev/null discards it)")
        if sys.stdin is None:  # `<&-`: read as an empty stdin, as </dev/null is
            sys.stdin = open(os.devnull)
        status = run(settings)
        _flush_stdout()
        return status
    except UserError as error:
        return report(error)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`gemma-chat --cli ... | head`): nothing left to say to anyone.
        _stdout_to_null()
        return 0
    except OutputFailed as error:
        # Output to a full disk or a failing device (`> /dev/full`): said, not a traceback.
        _stdout_to_null()
        return report(UserError(f"cannot write the output: {error.strerror or error}", status=1))
    finally:
        # The caller's own stream back (main() run in a process of its own making): dropped, it
        # would be collected, and closed under the descriptor the wrapper writes to.
        sys.stdout = caller_stdout


class OutputFailed(OSError):
    """A write to stdout failed: told apart from every other OSError, which names some file."""


class _Output(io.FileIO):
    failed: OutputFailed | None = None

    def write(self, data: Any) -> int | None:
        try:
            return super().write(data)
        except BrokenPipeError:
            raise
        except OSError as error:
            self.failed = OutputFailed(error.errno, error.strerror)
            raise self.failed from None


def _flush_stdout() -> None:
    """Here, where a failure is told, not at the interpreter's exit; and a write that failed
    earlier counts too: argparse's --help and --version swallow their own failed writes."""
    if sys.stdout is None:
        return
    sys.stdout.flush()
    raw = getattr(getattr(sys.stdout, "buffer", None), "raw", None)
    if isinstance(raw, _Output) and raw.failed is not None:
        raise raw.failed


def _guard_stdout() -> None:
    """stdout, the same file with the same encoding and buffering, whose failed writes raise
    OutputFailed."""
    out = sys.stdout
    try:
        descriptor = out.fileno()
        out.flush()
    except (AttributeError, OSError, ValueError):  # not a real file (an embedding host's stand-in)
        return
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(_Output(descriptor, "w", closefd=False)), encoding=out.encoding,
                                  errors=out.errors, line_buffering=out.line_buffering)


def _stdout_to_null() -> None:
    # So that the interpreter's final flush of what stdout still holds does not complain.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

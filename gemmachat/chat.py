"""The chat's start: the model, the OpenAI-compatible server beside it, then the input loop
(gemmachat/repl.py).

Most of the way to the first prompt is llama.cpp reading the weights: one long C call, which
releases the GIL. What the prompt needs after it (prompt_toolkit, and rich's Markdown for the first
reply) is imported on a second thread meanwhile. The server starts behind the prompt, on a port
bound before the banner names it: FastAPI and uvicorn take a third of a second to import on 2
cores, which would delay the prompt on a busy machine even if imported during the load, where
they compete with it for the CPU (docs/performance.md, "chat start-up").
"""

from __future__ import annotations

import importlib
import sys
import threading
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, TextIO

import platformdirs

from gemmachat.engine import Engine, load_engine
from gemmachat.errors import UserError
from gemmachat.listen import bind_socket, page_url
from gemmachat.model_path import resolve_model
from gemmachat.models import LocalModel
from gemmachat.output import Printer
from gemmachat.settings import Settings
from gemmachat.templates import Template, load_template

if TYPE_CHECKING:
    from gemmachat.server import BackgroundServer

# The background server takes the first free port from --port on, as llamafile does: a second
# chat, or another program on 8080, should not leave the chat without its server.
SERVER_PORT_TRIES = 10
# In the order the chat needs them once the model is loaded.
CHAT_MODULES = ("gemmachat.repl", "rich.markdown", "rich.live")


def import_behind(modules: Iterable[str]) -> None:
    """Imports `modules` on a daemon thread. The main thread imports them again where it needs
    them: that import waits for one in progress, and raises any error of its own, where it is
    handled, so a failure here is left to it."""

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - reported by the main thread's own import
                pass

    threading.Thread(target=run, name="gemma-chat imports", daemon=True).start()


def run_chat(settings: Settings, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    is_terminal = stdin.isatty() and stdout.isatty()
    printer = Printer(plain=settings.plain or not stdout.isatty(), stream=stdout,
                      errors=None if stdout.isatty() else sys.stderr)
    template = load_template(settings.template)
    if settings.remote is not None:
        return _chat_remotely(settings, template, printer, stdin, is_terminal)
    with_server = settings.mode == "chat"
    sequences = 1 + settings.parallel if with_server else 1
    # First, outside the spinner: the first start copies the model with a progress bar of its own,
    # which the spinner's live display would freeze at its first frame. And before the imports
    # behind: they would slow the copy, which holds the GIL, instead of filling llama.cpp's load.
    model = resolve_model(settings.model, settings.environ, hf_repo=settings.hf_repo, hf_file=settings.hf_file)
    import_behind(CHAT_MODULES)
    spinner = printer.console.status("loading model…") if is_terminal and not printer.plain else nullcontext()
    with spinner:
        engine = load_engine(settings, sequences, model=model)
    from gemmachat import repl

    with LocalModel(engine) as model:
        server, server_line = start_server(engine, settings) if with_server else (None, None)
        try:
            notices = server.take_failure if server is not None else repl.no_notices
            return repl.converse(model, settings, template, printer, server_line, stdin, is_terminal, notices)
        finally:
            if server is not None:
                server.stop()


def _chat_remotely(settings: Settings, template: Template, printer: Printer, stdin: TextIO,
                   is_terminal: bool) -> int:
    """--remote: nothing to load, and no server beside the chat (the one it talks to serves)."""
    from gemmachat import remote, repl

    with remote.connect(settings) as model:
        return repl.converse(model, settings, template, printer, None, stdin, is_terminal)


class ServerBehind:
    """The server beside the chat, started on a thread so that the prompt does not wait for it.

    Its socket is bound and listening before the banner names it: a client that connects meanwhile
    waits in the backlog. Should the server still fail to start, `take_failure` says so once.
    """

    def __init__(self, start: Callable[[], BackgroundServer]) -> None:
        self._server: BackgroundServer | None = None
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._start, args=(start,), name="gemma-chat server start",
                                        daemon=True)
        self._thread.start()

    def _start(self, start: Callable[[], BackgroundServer]) -> None:
        try:
            self._server = start()
        except Exception as error:  # noqa: BLE001 - one line in the chat, not a traceback over it
            self._failure = f"server: off ({error})"

    def take_failure(self) -> str | None:
        failure, self._failure = self._failure, None
        return failure

    def stop(self) -> None:
        """Once it has started (or failed to): cancel in-flight requests and stop."""
        self._thread.join()
        if self._server is not None:
            self._server.stop()


def start_server(engine: Engine, settings: Settings) -> tuple[ServerBehind | None, str]:
    """The OpenAI-compatible server beside the chat, on the same weights (sequences 1..N): its port
    bound now, the rest behind the prompt."""
    try:
        sock = bind_socket(settings.host, settings.port, SERVER_PORT_TRIES)
    except UserError as error:
        return None, f"server: off ({error})"
    # The chat defaults to temperature 0, as llamafile; API clients get llama.cpp's 0.8 unless
    # --temp was given.
    server_settings = settings
    if not settings.temp_given:
        server_settings = replace(settings, sampling=replace(settings.sampling, temperature=0.8))
    log_path = Path(platformdirs.user_log_dir("gemma-chat")) / "server.log"
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = log_path.open("a", encoding="utf-8", buffering=1)
    except OSError:
        log_file = None

    def log(line: str) -> None:
        # Access lines go to a file: printed, they would garble the chat's terminal.
        if log_file is not None:
            log_file.write(line.rstrip("\n") + "\n")

    def start() -> BackgroundServer:
        from gemmachat.server import start_background

        return start_background(engine, server_settings, list(range(1, 1 + settings.parallel)), log=log, sock=sock)

    moved = f"port {settings.port} is in use; " if sock.getsockname()[1] != settings.port else ""
    return ServerBehind(start), (f"server: {page_url(sock, settings.host)} ({moved}the chat page, and an "
                                 f"OpenAI-compatible API; log in {log_path})")

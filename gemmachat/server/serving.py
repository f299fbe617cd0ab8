"""Serving: `--server` in the foreground until a signal, the chat's server on a background
thread, and uvicorn under both."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
import time

import uvicorn

from gemmachat import fatal
from gemmachat.engine import Engine, load_engine
from gemmachat.errors import UserError, report
from gemmachat.listen import ServerUnavailable, bind_socket, page_url, url_of
from gemmachat.server import page_routes
from gemmachat.server.app import create_app
from gemmachat.server.core import LogFn, ServerCore, to_stderr
from gemmachat.settings import Settings

SHUTDOWN_SECONDS = 3.0  # how long in-flight work gets to wind down once cancelled


class _Server(uvicorn.Server):
    # Signals are ours to handle (uvicorn's would re-raise SIGTERM after shutdown, exiting 143).
    def capture_signals(self):  # type: ignore[override]
        import contextlib

        return contextlib.nullcontext()


class _LogHandler(logging.Handler):
    def __init__(self, log: LogFn) -> None:
        super().__init__()
        self.log = log
        self.setFormatter(logging.Formatter("gemma-chat: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log(self.format(record))
        except Exception:  # noqa: BLE001
            pass


def _uvicorn(core: ServerCore) -> tuple[_Server, _LogHandler]:
    config = uvicorn.Config(
        create_app(core), log_config=None, access_log=False, lifespan="off", http="h11", ws="none",
        loop="asyncio", timeout_graceful_shutdown=int(SHUTDOWN_SECONDS), timeout_keep_alive=5,
        server_header=False, proxy_headers=False,
    )
    handler = _LogHandler(core.log)
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if core.verbose else logging.WARNING)
    logger.propagate = False
    return _Server(config), handler


async def _serve(core: ServerCore, server: _Server, sock: socket.socket) -> None:
    core.loop = asyncio.get_running_loop()
    await server.serve(sockets=[sock])


class BackgroundServer:
    """The server on a daemon thread, sharing an engine the caller owns."""

    def __init__(self, core: ServerCore, server: _Server, handler: _LogHandler, sock: socket.socket) -> None:
        self.core = core
        self.port = sock.getsockname()[1]
        self.url = url_of(sock, core.settings.host)
        self._server = server
        self._handler = handler
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="gemma-chat server", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(_serve(self.core, self._server, self._sock))
        except BaseException as error:  # noqa: BLE001 - SystemExit from uvicorn included
            self.error = error
            self.core.log(f"gemma-chat: the server stopped: {error}")

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            self.stop()
            raise ServerUnavailable(f"the server did not start{': ' + str(self.error) if self.error else ''}")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel in-flight requests and stop; the engine can be closed once this returns."""
        self.core.shutdown()
        self._server.should_exit = True
        self._thread.join(timeout)
        self.core.join_workers(SHUTDOWN_SECONDS)
        self._sock.close()
        logging.getLogger("uvicorn.error").removeHandler(self._handler)


def start_background(engine: Engine, settings: Settings, seq_ids: list[int], log: LogFn | None = None,
                     max_body: int | None = None, sock: socket.socket | None = None) -> BackgroundServer:
    """Serve the API beside the chat on `sock` (bind_socket's; it is the server's from then on),
    else on settings.host:settings.port, on sequences `seq_ids`. Returns once it is serving.

    Raises ServerUnavailable (a UserError, one line) if the port cannot be bound or the server does
    not start. Access log lines and server warnings go to `log` (default: stderr).
    """
    if sock is None:
        sock = bind_socket(settings.host, settings.port)
    try:
        core = ServerCore(engine, settings, seq_ids, log, max_body)
        server, handler = _uvicorn(core)
    except BaseException:
        sock.close()
        raise
    background = BackgroundServer(core, server, handler, sock)
    background.start()
    return background


def serve(settings: Settings, log: LogFn | None = None) -> int:
    """`--server`: serve until SIGINT or SIGTERM, then cancel in-flight work and return 0."""
    sock = bind_socket(settings.host, settings.port)  # before loading: a taken port fails fast
    try:
        engine = load_engine(settings, sequences=settings.parallel, shared_kv=False)
    except BaseException:
        sock.close()
        raise
    try:
        core = ServerCore(engine, settings, list(range(settings.parallel)), log)
        server, _ = _uvicorn(core)
    except BaseException:
        sock.close()
        engine.close()
        raise

    def on_signal(signum: int, frame: object) -> None:
        if server.should_exit:
            server.force_exit = True  # a second ctrl-c: stop waiting for anything
        server.should_exit = True
        core.shutdown()

    fatal.interrupts_to_python()  # and at once replaced by the server's graceful shutdown
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    to_stderr(f"gemma-chat: serving {url_of(sock, settings.host)} (model {engine.name}, "
            f"{settings.parallel} slot{'s' if settings.parallel != 1 else ''})")
    page_routes.open_browser(page_url(sock, settings.host), settings.nobrowser, settings.environ)
    try:
        asyncio.run(_serve(core, server, sock))
    finally:
        core.shutdown()
        core.join_workers(SHUTDOWN_SECONDS)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        engine.close()  # waits for calls into llama.cpp still running on other threads
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m gemmachat.server ARGS`: the same as `gemma-chat --server ARGS`."""
    from gemmachat.settings import parse_settings

    try:
        return serve(parse_settings(["--server", *(sys.argv[1:] if argv is None else argv)]))
    except UserError as error:
        return report(error)
    except KeyboardInterrupt:  # while loading, before the server handles signals
        print(file=sys.stderr)
        return 130

"""The server's listening socket, without its HTTP stack: the chat binds it and names its URL
without waiting for FastAPI and uvicorn to be imported (gemmachat/chat.py)."""

from __future__ import annotations

import errno
import socket

from gemmachat.errors import UserError


class ServerUnavailable(UserError):
    """The server cannot start (the port is taken, the address does not exist)."""


class _PortInUse(ServerUnavailable):
    pass


def bind_socket(host: str, port: int, tries: int = 1) -> socket.socket:
    """A listening socket on `port` or, while the port is taken, on the next of `tries` ports (as
    llamafile looks for a free one); else a one-line ServerUnavailable saying why not."""
    last = min(port + tries, 65536) - 1
    for candidate in range(port, last + 1):
        try:
            return _bind(host, candidate)
        except _PortInUse:
            pass
    taken = f"port {port} is" if last == port else f"ports {port} to {last} are"
    raise ServerUnavailable(f"{taken} in use; choose another with --port")


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ServerUnavailable(f"cannot listen on {host}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise _PortInUse(f"port {port} is in use") from None
        if error.errno == errno.EACCES:
            message = f"not allowed to listen on port {port}"
        elif error.errno == errno.EADDRNOTAVAIL:
            message = f"cannot listen on {host}: no such address on this machine"
        else:
            message = f"cannot listen on {host}:{port}: {error.strerror}"
        raise ServerUnavailable(message) from None
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def page_url(sock: socket.socket, host: str) -> str:
    """The chat page's address: a server on every address (0.0.0.0, ::) is opened on loopback."""
    return url_of(sock, {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)) + "/"

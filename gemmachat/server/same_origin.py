"""Which browsers' requests the server takes: its own page's, never another web page's.

A web page on any other site can send the server a "simple" cross-origin request (a POST with a
text/plain body needs no CORS preflight), and the server reads every body as JSON, as llama.cpp
does for `curl -d`. Without a guard, any site a user visits could rewrite or plant stored
conversations, or run the model. Browsers name the page behind such a request in its Origin header,
so one that names another origin is refused. Clients that are not browsers send no Origin.

DNS rebinding gets past that check: a site re-points its own name at 127.0.0.1, and its page is then
"same-origin" with the server. What gives it away is the Host header, which still carries the
site's name; so a server listening on a loopback address answers only requests for a loopback name.
A server asked to listen on every address (or a LAN address) is reached by names of its own; there
the Origin check alone stands. `--allow-origin` names origins to take besides (a reverse proxy's
public address, a web app or a browser extension that calls the API), and their names as Host.
Their pages also get CORS headers, and their preflight requests an answer, so that a browser lets
them read the replies; the server's own page needs neither.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from gemmachat import openai_api as api

EVERY_ADDRESS = ("", "0.0.0.0", "::")


def refusal(headers: dict[str, str], local_address: str | None, bind_host: str,
            allowed: tuple[str, ...] = ()) -> api.ApiError | None:
    """The 403 a request gets, or None when it may go on. `headers` are lower-cased names;
    `local_address` is the address the connection came in on; `allowed`, --allow-origin's origins."""
    host = headers.get("host", "")
    named = _hostname(host).lower()
    if (bind_host not in EVERY_ADDRESS and _is_loopback(local_address) and host and not _local_name(named)
            and named not in {urlsplit(origin).hostname for origin in allowed}):
        return api.ApiError(403, f"refused a request for {host!r}: this server listens on a local "
                            "address and answers requests for local names and IP addresses (a guard "
                            "against DNS rebinding); --allow-origin http://NAME:PORT adds a name",
                            code="host_not_allowed")
    origin = headers.get("origin")
    if origin is not None and not _same_origin(origin, host) and not is_allowed(origin, allowed):
        return api.ApiError(403, f"refused a request from another web page (Origin: {origin}): this "
                            "server takes browser requests from its own page only (--allow-origin names others)",
                            code="cross_origin_refused")
    return None


def cors_origin(headers: dict[str, str], allowed: tuple[str, ...]) -> str | None:
    """The Origin to name in Access-Control-Allow-Origin: that of another page --allow-origin
    takes; None for the server's own page and for clients that are not browsers."""
    origin = headers.get("origin")
    if origin is None or _same_origin(origin, headers.get("host", "")) or not is_allowed(origin, allowed):
        return None
    return origin


def is_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether --allow-origin's list takes `origin`: named as it is, or by a pattern: `*` (every
    origin), `SCHEME://*` (every origin of a scheme, as chrome-extension://*) or
    `SCHEME://HOST:*` (every port of a host)."""
    origin = origin.lower()
    if origin in allowed or "*" in allowed:
        return True
    scheme, separator, _ = origin.partition("://")
    if separator and f"{scheme}://*" in allowed:
        return True
    try:
        parts = urlsplit(origin)
        port = parts.port  # a port that is not a number ("3000.evil.example") raises
    except ValueError:
        return False
    host = parts.netloc.rpartition(":")[0] if port is not None else parts.netloc
    return bool(separator) and f"{scheme}://{host}:*" in allowed


def _same_origin(origin: str, host: str) -> bool:
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()


def _hostname(host: str) -> str:
    """`host` without its port; an IPv6 address without its brackets."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _local_name(name: str) -> bool:
    """A name no attacker can point at this machine from public DNS: localhost, this machine's own
    name, a name of one label (an /etc/hosts alias, a container's name), or an address."""
    name = name.lower().rstrip(".")
    if "." not in name or name.endswith(".localhost") or name == socket.gethostname().lower():
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True  # a rebinding attack needs a name; an address is what the user typed


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False

"""The chat page with the machine's network cut off, run by tests/test_web.py inside a new network
namespace: there only loopback exists, so a script, style or font fetched from anywhere but
gemma-chat itself would fail to load. A real server and Debian's Chromium run in there; the page is
loaded, a message sent and its reply seen growing. What was seen is printed as one line of JSON for
the test to judge (the test, not this script, asserts)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct

from playwright.sync_api import sync_playwright
from test_server import ServerProcess
from test_web import CHROMIUM, CHROMIUM_ARGS, last_reply, seen_lengths, send, watch_lengths

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ = "16sh14x"  # struct ifreq: the interface's name, then its flags


def loopback_up() -> None:
    # A new namespace's loopback starts down. This is `ip link set lo up`, without needing
    # iproute2 where the tests run.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = struct.unpack(IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def outside() -> str:
    """What connecting out answers from in here: the proof that the namespace is cut off."""
    try:
        socket.create_connection(("1.1.1.1", 443), timeout=5).close()
        return "connected"
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error))


def main() -> None:
    loopback_up()
    seen: dict = {"interfaces": [name for _, name in socket.if_nameindex()], "outside": outside()}
    server = ServerProcess(dict(os.environ))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page()
            requests: list[str] = []
            failed: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            # The page's files, that is. Chromium sometimes reports the streamed POST
            # net::ERR_ABORTED after the page has read the whole reply (no error shown, the reply
            # complete); why is not known yet, and it is not what this test is about.
            page.on("requestfailed", lambda request: failed.append(f"{request.url}: {request.failure}")
                    if request.resource_type not in ("fetch", "xhr") else None)
            page.goto(server.url + "/")
            watch_lengths(page)
            send(page, "Count with me: 1, 2, 3,", "12")
            seen["error"] = page.locator("#error").text_content()
            seen.update(url=server.url, requests=list(requests), failed=list(failed), lengths=seen_lengths(page),
                        reply=last_reply(page).get_attribute("data-text"),
                        styled=page.evaluate("getComputedStyle(document.querySelector('#send')).borderRadius"))
            browser.close()
    finally:
        server.stop()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()

"""Screenshots of the chat page for the docs: light and dark, desktop and phone width.

Starts a real `gemma-chat --server --history` on a scratch data folder whose store holds a sample
conversation (its reply written here, to show the Markdown rendering: the default 270M base model
does not write Markdown), and photographs the page in Debian's headless Chromium.

Usage:
    .venv/bin/python docs/screenshots.py
Writes docs/web-light.png, docs/web-dark.png, docs/web-phone-light.png, docs/web-phone-dark.png.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gemmachat.store import Store  # noqa: E402
from gemmachat.templates import Message  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SAMPLE_REPLY = """Here is a function that reverses a string in Python:

```python
def reverse(text: str) -> str:
    return text[::-1]
```

- **slicing** with a step of `-1` walks the string backwards;
- it works for any sequence, lists included.

| way | cost |
|---|---|
| `text[::-1]` | one copy |
| `"".join(reversed(text))` | an iterator, then a copy |
"""
SHOTS = {"web-light.png": ("light", 1280, 800), "web-dark.png": ("dark", 1280, 800),
         "web-phone-light.png": ("light", 390, 844), "web-phone-dark.png": ("dark", 390, 844)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    data = Path(tempfile.mkdtemp(prefix="gemma-chat-shots-"))
    store = Store.open(data, print)
    store.write(store.create("", "", None, {}), 0, [Message("user", "Once upon a time")], None, "Once upon a time")
    number = store.create("", "", "You are a helpful assistant.", {})
    store.write(number, 0, [Message("user", "How do I reverse a string in Python? (a sample conversation)"),
                            Message("assistant", SAMPLE_REPLY)], "You are a helpful assistant.",
                "Reversing a string (a sample)")
    store.write(store.create("", "", None, {}), 0, [Message("user", "The capital of France is")], None,
                "The capital of France is")
    store.close()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gemmachat", "--server", "--nobrowser", "--history",
                               "--port", str(port), "-np", "1"], cwd=REPO,
                              env={**os.environ, "GEMMA_CHAT_DATA_DIR": str(data)})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            for name, (scheme, width, height) in SHOTS.items():
                context = browser.new_context(color_scheme=scheme, viewport={"width": width, "height": height})
                page = context.new_page()
                page.goto(f"{url}#{number}")
                expect(page.locator("#messages .message.assistant pre code.hljs")).to_be_visible()
                page.screenshot(path=str(REPO / "docs" / name))
                context.close()
                print(f"wrote docs/{name}")
            browser.close()
    finally:
        server.kill()
        server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

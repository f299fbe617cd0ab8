"""How the chat prints replies: Markdown rendered while streaming, plain text with no escapes."""

from __future__ import annotations

import io
import re
from typing import Iterator

from rich.console import Console

from gemmachat.output import Printer

ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
REPLY = ["Here is **bold** code:\n\n", "```python\n", "def answer():\n", "    return 42\n", "```\n\n",
         "And a list:\n\n", "- one\n", "- two"]


def terminal_printer(buffer: io.StringIO) -> Printer:
    printer = Printer(plain=False, stream=buffer)
    # The chat's console on a colour terminal, writing where the test can read it.
    printer.console = Console(file=buffer, force_terminal=True, color_system="truecolor", width=80,
                              highlight=False)
    return printer


def test_markdown_and_highlighted_code_appear_while_the_reply_streams() -> None:
    buffer = io.StringIO()
    seen_mid_reply: list[str] = []

    def pieces() -> Iterator[str]:
        for piece in REPLY:
            if piece.startswith("And a list"):
                # The code block is finished: it must be on screen, rendered, before the reply ends.
                seen_mid_reply.append(buffer.getvalue())
            yield piece

    terminal_printer(buffer).reply(pieces())
    middle = seen_mid_reply[0]
    assert "```" not in ESCAPE.sub("", middle), "the fence is rendered, not shown as text"
    # Syntax highlighting: the keyword and the number carry colour codes of their own.
    assert re.search(r"\x1b\[[0-9;]*m(def)\x1b", middle) and re.search(r"\x1b\[[0-9;]*m42\x1b", middle)
    assert "\x1b[1m" in middle and "**" not in ESCAPE.sub("", middle), "bold rendered"
    final = ESCAPE.sub("", buffer.getvalue())
    assert "• one" in final and "• two" in final


def test_plain_output_has_no_escape_codes_and_keeps_the_text() -> None:
    buffer = io.StringIO()
    Printer(plain=True, stream=buffer).reply(iter(REPLY))
    assert "\x1b" not in buffer.getvalue()
    assert buffer.getvalue() == "".join(REPLY) + "\n"


def test_an_interrupted_reply_keeps_what_was_shown() -> None:
    buffer = io.StringIO()

    def pieces() -> Iterator[str]:
        yield "Partial answer"
        raise KeyboardInterrupt

    try:
        terminal_printer(buffer).reply(pieces())
    except KeyboardInterrupt:
        pass
    assert "Partial answer" in ESCAPE.sub("", buffer.getvalue())

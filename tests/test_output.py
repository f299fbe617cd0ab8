"""How the chat prints replies: Markdown rendered while streaming, plain text with no escapes."""

from __future__ import annotations

import io
import re
from typing import Iterator

from rich.cells import cell_len
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


def test_a_line_break_in_a_paragraph_stays_a_line_break_as_on_the_chat_page() -> None:
    buffer = io.StringIO()
    terminal_printer(buffer).reply(iter(["Roses are red,\nViolets are blue.\n\n```\nx = 1  \ny = 2\n```\n",
                                         "- one\n- two"]))
    lines = [line.rstrip() for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue()).splitlines()]
    # CommonMark joined them: "Roses are red, Violets are blue."
    assert "Roses are red," in lines and "Violets are blue." in lines, lines
    assert " x = 1" in lines and " y = 2" in lines and "• one" in lines[-2] and "• two" in lines[-1]


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


def test_control_characters_from_a_model_or_a_file_reach_a_terminal_escaped_and_a_pipe_as_they_are() -> None:
    import os
    import pty

    hostile = "red\x1b[31m bell\x07 title\x1b]0;pwned\x07 nul\x00 cr\r tab\tok\nnext"
    for plain in (True, False):
        controller, terminal = pty.openpty()
        with os.fdopen(terminal, "w", closefd=True) as stream:
            printer = Printer(plain=plain, stream=stream)
            printer.text(hostile)
            printer.error(hostile)
            printer.reply(iter([hostile]))
        shown = os.read(controller, 65536).decode()
        os.close(controller)
        assert "\\x1b[31m" in shown and "\\x1b]0;pwned\\x07" in shown and "\\x00" in shown and "\\r" in shown
        assert "\x1b]0;" not in shown and "\x07" not in shown and "\x00" not in shown, repr(shown)
        assert "\tok" in shown or "    ok" in shown  # tabs and line breaks are layout, kept
    piped = io.StringIO()
    Printer(plain=True, stream=piped).text(hostile)
    assert piped.getvalue() == hostile + "\n"


def test_a_table_keeps_each_row_on_one_line_of_a_narrow_terminal_and_whole_in_a_pipe() -> None:
    # /history at 60 columns: each row wrapped over two or three lines.
    rows = [("*", "1", "2026-12-02 07:27", "1", "gemma-3-270m-q4_k_m-a5fd3b62230aa5ec.gguf",
             "Hello there 日本語, a title that goes on and on"), ("", "12", "2026-12-02 07:28", "14", "m", "Short"),
            ("", "13", "2026-12-02 07:29", "2", "m", "pasted\tcolumns\tof\ttext and a long tail of words")]
    header = ("", "id", "updated", "turns", "model", "title")
    buffer = io.StringIO()
    printer = Printer(plain=False, stream=buffer)
    printer.console = Console(file=buffer, width=60, highlight=False)
    printer.table(header, rows, right=(1, 3))
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 4 and all(cell_len(line.expandtabs()) <= 59 for line in lines), lines
    assert lines[3].endswith("…") and "\t" not in lines[3]  # a tab widened it past the edge
    assert lines[1].startswith("*   1  2026-12-02 07:27      1  gemma") and lines[1].endswith("…")
    assert lines[2].startswith("   12  2026-12-02 07:28     14  m") and lines[2].endswith("Short")
    piped = io.StringIO()
    Printer(plain=True, stream=piped).table(header, rows, right=(1, 3))
    assert piped.getvalue().splitlines()[1].endswith(
        "gemma-3-270m-q4_k_m-a5fd3b62230aa5ec.gguf  Hello there 日本語, a title that goes on and on")

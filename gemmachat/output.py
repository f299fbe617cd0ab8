"""What the chat prints: replies streamed as Markdown with rich, or plain text for pipes.

A reply is rendered while it streams. Only the block still being written lives in rich's Live
region; finished blocks are printed above it for good. Re-rendering the whole reply at every token
would cost more as it grows. A Live region taller than the terminal leaves a copy of its top in
the scrollback at every refresh (rich cannot move the cursor up past the screen's first line): so
while a block streams, only its last screenful is live, and the whole block is printed once, when
it is finished.
"""

from __future__ import annotations

import base64
import re
import sys
from typing import Iterable, TextIO

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.padding import Padding
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from gemmachat.errors import escaped, warn

_FENCE = re.compile(r"^\s*(```|~~~)", re.MULTILINE)


class Printer:
    def __init__(self, plain: bool, stream: TextIO | None = None, errors: TextIO | None = None) -> None:
        """`errors`: where error lines go instead of `stream`, as `gemma-chat: ...` lines (the piped
        chat's stderr, so that a script's captured replies hold no error text)."""
        self.stream = stream or sys.stdout
        self.errors = errors
        self.plain = plain
        self.console = Console(file=self.stream, no_color=plain, highlight=False,
                               force_terminal=None if not plain else False, soft_wrap=plain)
        # On a terminal, control characters in a reply, a file or a message are shown escaped: a
        # model or a file could otherwise move the cursor, recolour the screen or retitle the
        # window. Piped output stays the text as it is.
        self.escape = self.stream.isatty()

    def _shown(self, text: str) -> str:
        return escaped(text, keep="\n\t") if self.escape else text

    def info(self, text: str) -> None:
        text = self._shown(text)
        if self.plain:
            self._plain_line(text)
        else:
            self.console.print(Text(text, style="dim"))

    def error(self, text: str) -> None:
        if self.errors is not None:
            warn(text, self.errors)
            return
        text = self._shown(text)
        if self.plain:
            self._plain_line(text)
        else:
            self.console.print(Text(text, style="bold red"))

    def text(self, text: str) -> None:
        """Text shown as it is (a dump, a file): never interpreted as markup."""
        text = self._shown(text)
        if self.plain:
            self._plain_line(text)
        else:
            self.console.print(Text(text))

    def rows(self, rows: Iterable[tuple[str, object]], width: int) -> None:
        """Two columns, the first `width` wide: on a terminal the second wraps under itself (it
        wrapped to the line's start, under the first); a pipe gets one line a row."""
        rows = [(self._shown(name), self._shown(str(value))) for name, value in rows]
        if self.plain:
            self._plain_line("\n".join(f"  {name:<{width}} {value}".rstrip() for name, value in rows))
            return
        table = Table.grid(padding=(0, 1))
        table.add_column(min_width=width, no_wrap=True)
        table.add_column(overflow="fold")
        for name, value in rows:
            table.add_row(Text(name), Text(value))
        self.console.print(Padding(table, (0, 0, 0, 2)))

    def table(self, header: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> None:
        """Columns under a header, those numbered in `right` aligned right. On a terminal every row
        stays one line: the last two columns are cut short (…) to fit its width, where a row had
        wrapped over two or three lines. A pipe gets the whole text."""
        # Each cell one line of single spaces: a tab in a title, zero cells wide to cell_len, was
        # widened by the terminal past the column's end.
        rows = [header, *(tuple(self._shown(" ".join(cell.split())) for cell in row) for row in rows)]
        widths = [max(cell_len(row[index]) for row in rows) for index in range(len(header))]
        if not self.plain:
            # What the first columns leave, shared by the last two: the second-to-last (a model's
            # file name) gets a third of it, or what the last leaves.
            room = max(2, self.console.size.width - 1 - sum(widths[:-2]) - 2 * (len(widths) - 1))
            widths[-2] = max(1, min(widths[-2], max(room // 3, room - widths[-1])))
            widths[-1] = max(1, min(widths[-1], room - widths[-2]))
        lines = []
        for row in rows:
            cells = [_fitted(cell, width) for cell, width in zip(row, widths)]
            lines.append("  ".join(cell.rjust(width) if index in right else cell + " " * (width - cell_len(cell))
                                   for index, (cell, width) in enumerate(zip(cells, widths))).rstrip())
        if self.plain:
            self._plain_line("\n".join(lines))
        else:
            self.console.print(Text("\n".join(lines)), no_wrap=True, crop=True)

    def to_clipboard(self, text: str) -> None:
        """Hand `text` to the terminal's clipboard with OSC 52 (ESC ] 52 ; c ; base64 BEL), which
        terminals honour over SSH too, where no local clipboard tool could reach."""
        self.stream.write(f"\x1b]52;c;{base64.b64encode(text.encode('utf-8')).decode('ascii')}\a")
        self.stream.flush()

    def _plain_line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def reply(self, pieces: Iterable[str]) -> None:
        """Shows a reply as it streams. A KeyboardInterrupt or error leaves what came so far."""
        pieces = map(self._shown, pieces)
        if self.plain:
            try:
                for piece in pieces:
                    self.stream.write(piece)
                    self.stream.flush()
            finally:
                self.stream.write("\n")
                self.stream.flush()
            return
        # Imported here: the chat's start imports them while the model loads (gemmachat/chat.py).
        from rich.live import Live
        from rich.markdown import Markdown

        written = ""
        committed = 0
        with Live(console=self.console, refresh_per_second=15, vertical_overflow="visible",
                  transient=False) as live:
            try:
                for piece in pieces:
                    written += piece
                    cut = _settled_prefix(written, committed)
                    if cut > committed:
                        live.console.print(Markdown(_line_breaks_kept(written[committed:cut])))
                        committed = cut
                    live.update(_Tail(Markdown(_line_breaks_kept(written[committed:]))), refresh=True)
            finally:
                live.update(Markdown(_line_breaks_kept(written[committed:])))


def _fitted(text: str, width: int) -> str:
    """`text` cut to `width` cells, with … where it was cut."""
    if cell_len(text) <= width:
        return text
    return set_cell_size(text, width - 1) + "…"


def _line_breaks_kept(text: str) -> str:
    """Markdown in which each line break of the text is a hard one, as the chat page renders replies
    (marked's `breaks`): CommonMark joins the lines of a paragraph, and a poem or an address lost
    its lines. Code fences are left as they are."""
    lines = text.split("\n")
    fenced = False
    for index, line in enumerate(lines[:-1]):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.strip() and lines[index + 1].strip():
            lines[index] = line + "  "
    return "\n".join(lines)


class _Tail:
    """The last lines of a renderable that fit the terminal (with a line to spare for the cursor)."""

    def __init__(self, renderable: RenderableType) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options, pad=False)
        for line in lines[-max(1, console.size.height - 1):]:
            yield from line
            yield Segment.line()


def _settled_prefix(text: str, start: int) -> int:
    """Where the finished blocks of `text` end: the last blank line outside a code fence."""
    end = text.rfind("\n\n", start)
    while end > start:
        inside_fence = len(_FENCE.findall(text, start, end)) % 2 == 1
        if not inside_fence:
            return end + 2
        end = text.rfind("\n\n", start, end)
    return start

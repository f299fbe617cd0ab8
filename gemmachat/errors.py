"""The one exception type for mistakes a user can make: it becomes a single line and an exit status;
the one way to warn the user without stopping; and the one escaping of untrusted text for a log or
a terminal."""

import re
import sys
from typing import TextIO

# Characters that end a line, move the cursor, recolour or retitle a terminal, or reorder what is
# shown: C0 and C1 controls (ESC, NUL, CR, LF...), DEL, the Unicode line and paragraph separators,
# and the bidirectional overrides and isolates.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class UserError(Exception):
    """A problem the user can fix: shown as one line on stderr, never as a traceback."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class PromptTooLong(UserError):
    """Text that does not fit in the context: refused before it is tokenized whole, or before it is
    evaluated."""


def escaped(text: str, keep: str = "") -> str:
    """`text` with each control character written as its Python escape (\\x1b, \\n, \\x00), except
    those in `keep`: text from a request, a model or a file can then neither forge a log line nor
    drive a terminal."""
    return _CONTROL.sub(lambda match: match.group() if match.group() in keep else repr(match.group())[1:-1], text)


def one_line(text: str, limit: int = 500) -> str:
    """Untrusted text (a request's field name, a URL path) as one printable line of at most `limit`
    characters."""
    text = escaped(text)
    return text if len(text) <= limit else text[:limit] + "…"


def warn(message: str, stream: TextIO | None = None) -> None:
    print(f"gemma-chat: {one_line(message, 2000)}", file=stream or sys.stderr, flush=True)


def report(error: UserError) -> int:
    """A user error as its one line on stderr; returns the exit status it asks for."""
    warn(str(error))
    return error.status

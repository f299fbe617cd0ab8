"""The one exception type for mistakes a user can make: it becomes a single line and an exit status;
and the one way to warn the user without stopping."""

import sys


class UserError(Exception):
    """A problem the user can fix: shown as one line on stderr, never as a traceback."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def warn(message: str) -> None:
    print(f"gemma-chat: {message}", file=sys.stderr)

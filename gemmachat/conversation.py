"""A conversation: the system prompt, the messages, checkpoints, and its file format.

Saved conversations are versioned JSON written atomically. Loading validates everything before
anything changes, so a malformed or foreign file leaves the current conversation as it was.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from gemmachat.errors import UserError
from gemmachat.safe_io import read_file, write_file
from gemmachat.templates import Message

FILE_FORMAT = "gemma-chat conversation"
FILE_VERSION = 1
ROLES = ("user", "assistant", "system")
# Far more than a context holds: a conversation keeps what was dropped from the context too.
FILE_LIMIT = 32 << 20


@dataclass
class Conversation:
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    checkpoints: list[tuple[str | None, list[Message]]] = field(default_factory=list)

    def add(self, message: Message) -> None:
        self.messages.append(message)

    def clear(self) -> None:
        """Back to just after the system prompt, as llamafile's /clear (checkpoints go too)."""
        self.messages.clear()
        self.checkpoints.clear()

    def undo(self, one_message: bool = False) -> list[Message]:
        """Drops the last exchange (the last user message and what followed it)."""
        if not self.messages:
            return []
        if one_message:
            return [self.messages.pop()]
        cut = len(self.messages) - 1
        while cut > 0 and self.messages[cut].role != "user":
            cut -= 1
        dropped = self.messages[cut:]
        del self.messages[cut:]
        return dropped

    def forget(self) -> Message | None:
        """Drops the oldest message; the system prompt stays."""
        return self.messages.pop(0) if self.messages else None

    def drop_oldest_exchange(self) -> list[Message]:
        """Drops the oldest user message and the replies up to the next user message."""
        if not self.messages:
            return []
        end = 1
        while end < len(self.messages) and self.messages[end].role != "user":
            end += 1
        dropped = self.messages[:end]
        del self.messages[:end]
        return dropped

    def push(self) -> int:
        self.checkpoints.append((self.system, list(self.messages)))
        return len(self.checkpoints)

    def pop(self) -> bool:
        if not self.checkpoints:
            return False
        self.system, self.messages = self.checkpoints.pop()
        return True

    def replace_last_reply(self, message: Message) -> None:
        if self.messages and self.messages[-1].role == "assistant":
            self.messages[-1] = message
        else:
            self.messages.append(message)

    # -- files -----------------------------------------------------------------------------------

    def to_json(self) -> str:
        document = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "system": self.system,
            "messages": [
                {"role": m.role, "content": m.content, **({"interrupted": True} if m.interrupted else {})}
                for m in self.messages
            ],
        }
        return json.dumps(document, ensure_ascii=False, indent=2) + "\n"

    def save(self, path: Path) -> None:
        write_file(path, self.to_json().encode("utf-8"), replaces=(_is_saved_conversation, "a saved conversation"))

    @classmethod
    def load(cls, path: Path) -> Conversation:
        raw = read_file(path, FILE_LIMIT, "/load takes conversations")
        try:
            document = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"cannot load {path}: not a gemma-chat conversation ({error})") from None
        except RecursionError:  # [[[[... 200,000 deep: the parser's own limit, not a crash
            raise UserError(f"cannot load {path}: not a gemma-chat conversation (nested too deeply)") from None
        return cls.from_document(document, str(path))

    @classmethod
    def from_document(cls, document: object, origin: str) -> Conversation:
        def refuse(why: str) -> UserError:
            return UserError(f"cannot load {origin}: {why}")

        if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
            raise refuse("not a gemma-chat conversation")
        version = document.get("version")
        if not isinstance(version, int) or version > FILE_VERSION or version < 1:
            raise refuse(f"version {version!r} is not supported (this program reads up to {FILE_VERSION})")
        system = document.get("system")
        if system is not None and not isinstance(system, str):
            raise refuse("'system' must be text")
        messages = document.get("messages")
        if not isinstance(messages, list):
            raise refuse("'messages' must be a list")
        loaded = []
        for index, item in enumerate(messages):
            if (not isinstance(item, dict) or item.get("role") not in ROLES
                    or not isinstance(item.get("content"), str)):
                raise refuse(f"message {index + 1} needs a role ({', '.join(ROLES)}) and text content")
            loaded.append(Message(item["role"], item["content"], interrupted=item.get("interrupted") is True))
        return cls(system=system, messages=loaded)



def _is_saved_conversation(head: bytes) -> bool:
    """The start of a file /save wrote (or one edited since): its format named near the top."""
    return re.search(rb'"format"\s*:\s*"' + re.escape(FILE_FORMAT.encode()) + rb'"', head[:4096]) is not None

"""Saved KV caches, one file per stored conversation, beside the database.

A file holds what the engine's sequence_state gave (llama.cpp's serialised cache, opaque here),
the tokens it stands for, the tokens each reply was generated as (re-tokenizing a reply's text
may give other tokens, and the cache would no longer match), and the fingerprint of the engine
that made it: it is used only by an engine with the same model file, llama.cpp and cache layout.
Written atomically: a kill leaves the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from gemmachat.safe_io import write_file
from gemmachat.errors import UserError
from gemmachat.templates import Message

MAGIC = b"gemma-chat kv state 1\n"
# Saved caches kept, the most recently saved ones: each is megabytes for the default model and
# can be hundreds of megabytes for a 4B model's long conversation. Older conversations resume by
# evaluating them again.
KEPT_STATES = 8


@dataclass(frozen=True)
class SavedState:
    tokens: list[int]
    state: bytes
    replies: dict[int, list[int]]  # stored message position -> the tokens that reply was generated as


def path_for(folder: Path, conversation_id: int) -> Path:
    return folder / "kv" / f"{conversation_id}.state"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


def save(path: Path, fingerprint: str, tokens: list[int], state: bytes,
         messages: list[tuple[int, Message]]) -> None:
    """`messages`: (stored position, message) of the replies whose tokens are known."""
    replies = {str(position): {"digest": _digest(m.content), "tokens": list(m.tokens or ())}
               for position, m in messages if m.role == "assistant" and m.tokens}
    header = json.dumps({"fingerprint": fingerprint, "tokens": tokens, "replies": replies}).encode()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a cache holds the conversation too
    write_file(path, MAGIC + header + b"\n" + state)
    _prune(path.parent, KEPT_STATES)


def _prune(folder: Path, keep: int) -> None:
    def saved_at(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:  # another process pruned it meanwhile
            return 0.0

    for old in sorted(folder.glob("*.state"), key=saved_at, reverse=True)[keep:]:
        old.unlink(missing_ok=True)


def load(path: Path, fingerprint: str, messages: list[Message]) -> tuple[SavedState | None, str]:
    """The state saved for `messages` (the stored conversation, from position 0), or None and why
    it cannot be used."""
    try:
        with path.open("rb") as file:
            if file.readline() != MAGIC:
                return None, "its saved state is in another format"
            header = json.loads(file.readline())
            if header["fingerprint"] != fingerprint:
                return None, "the model or the settings that shape its cache changed"
            state = file.read()
        replies = {
            int(key): [int(token) for token in reply["tokens"]]
            for key, reply in header["replies"].items()
            if int(key) < len(messages) and _digest(messages[int(key)].content) == reply["digest"]
        }
        return SavedState([int(token) for token in header["tokens"]], state, replies), ""
    except FileNotFoundError:
        return None, "no saved state"
    except OSError as error:
        return None, f"its saved state is unreadable ({error.strerror or error})"
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, "its saved state is damaged"


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise UserError(f"cannot remove {path}: {error.strerror or error}") from None

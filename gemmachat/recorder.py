"""One chat session's conversation, kept in the store as it changes, and resumed from it.

The chat calls `sync` whenever its conversation may have changed (a message sent, a reply done,
a command run); the difference with what was written last goes to the store in one transaction.
Messages the context had to drop stay stored (they are still part of the conversation), so the
session's messages are the stored ones from `offset` on.

Storing must never cost the chat: when the store fails (a full disk, a read-only folder), one
line says so and the chat goes on with its conversation in memory, unstored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, ContextManager

from gemmachat import kvstate
from gemmachat.engine import common_prefix
from gemmachat.errors import UserError
from gemmachat.safe_io import locked
from gemmachat.session import Session
from gemmachat.settings import Settings
from gemmachat.store import ConversationChanged, Store, StoreError, Summary, Version, data_dir, title_from
from gemmachat.templates import Message

Key = tuple[str, str, bool]


def recorded_settings(settings: Settings, context: int | None) -> dict[str, object]:
    """What a stored conversation records of how it was made (the chat's and the page's alike)."""
    return {"template": settings.template, "jinja": settings.jinja, "context": context,
            "temperature": settings.sampling.temperature}


def _key(message: Message) -> Key:
    return message.role, message.content, message.interrupted


class Recorder:
    def __init__(self, session: Session, store: Store | None, folder: Path, notify: Callable[[str], None],
                 off_reason: str, settings: dict[str, object] | None = None) -> None:
        self.session = session
        self.store = store
        self.folder = folder
        self.notify = notify
        self.off_reason = off_reason  # why store is None
        self.settings = settings or {}
        self.conversation_id: int | None = None
        self._written: list[Key] = []
        self._written_system: str | None = None
        self._offset = 0
        self._version: Version | None = None  # the stored conversation's, after our last write
        self._state_tokens: list[int] = []  # what the saved (or restored) cache holds
        self._state_problem_told = False

    @classmethod
    def open(cls, session: Session, settings: Settings, notify: Callable[[str], None],
             required: bool = False) -> Recorder:
        """The recorder the settings ask for: off with --no-history (or history = false), and off
        with one line through `notify` when the store cannot be used (StoreError if `required`)."""
        folder = data_dir(settings.environ)
        recorded = recorded_settings(settings, session.context_size)
        if settings.keep_history is False:
            return cls(session, None, folder, notify, "conversations are not kept (--no-history)")
        try:
            store = Store.open(folder, notify)
        except StoreError as error:
            if required:
                raise
            notify(f"conversations are not kept: {error}")
            return cls(session, None, folder, notify, f"conversations are not kept: {error}")
        return cls(session, store, folder, notify, "", recorded)

    def turn_lock(self) -> ContextManager[None]:
        """Held, other processes that take it wait: for --cli's turns in stored conversations."""
        return locked(self.folder / "turn.lock", lambda: self.notify(
            "waiting for another gemma-chat call to finish its turn in the stored conversations"))

    def require(self) -> Store:
        if self.store is None:
            raise UserError(self.off_reason)
        return self.store

    # -- keeping ---------------------------------------------------------------------------------

    def sync(self) -> None:
        """Write what changed in the session's conversation since the last sync."""
        if self.store is None:
            return
        conversation = self.session.conversation
        keys = [_key(m) for m in conversation.messages]
        kept = self._written[self._offset:]
        same = common_prefix(kept, keys)
        if same == len(kept) == len(keys) and conversation.system == self._written_system:
            return
        title = title_from(conversation.messages)
        try:
            if self.conversation_id is None:
                if not keys:
                    return  # nothing worth a conversation yet
                self.conversation_id = self.store.create(title, self.session.model_name, conversation.system,
                                                         self.settings)
                self._version = self.store.version(self.conversation_id)
            try:
                self._version = self.store.write(self.conversation_id, self._offset + same,
                                                 conversation.messages[same:], conversation.system, title,
                                                 expected=self._version)
            except ConversationChanged:
                same = self._fork(title)
                self._version = self.store.write(self.conversation_id, self._offset, conversation.messages,
                                                 conversation.system, title)
        except StoreError as error:
            self._turn_off(error)
            return
        self._written = self._written[:self._offset + same] + keys[same:]
        self._written_system = conversation.system

    def _fork(self, title: str) -> int:
        """Another process (the chat page, a second chat) changed or deleted the stored conversation
        since this chat last wrote it: writing on would overwrite its messages, so this chat goes
        on as a new conversation, with the stored messages the context had dropped. Returns how
        many of the session's messages that one holds (none)."""
        assert self.store is not None and self.conversation_id is not None
        old = self.conversation_id
        earlier: list[Message] = []
        if self._offset and self.store.version(old) is not None:
            earlier = self.store.load(old)[1].messages[:self._offset]
        system = self.session.conversation.system
        self.conversation_id = self.store.create(title, self.session.model_name, system, self.settings)
        self.store.write(self.conversation_id, 0, earlier, system, title)
        self._written, self._offset = [_key(m) for m in earlier], len(earlier)
        self.notify(f"conversation {old} was changed elsewhere (the chat page or another chat); this chat goes "
                    f"on as conversation {self.conversation_id}")
        return 0

    def dropped(self, count: int) -> None:
        """The context dropped the session's `count` oldest messages: they stay stored."""
        self._offset += count

    def _turn_off(self, error: StoreError) -> None:
        assert self.store is not None
        self.store.close()
        self.store = None
        self.off_reason = f"conversations are no longer kept: {error}"
        self.notify(f"{self.off_reason} (this one stays in memory: /save FILE keeps it)")

    def _attach(self, conversation_id: int | None, written: list[Key], system: str | None,
                version: Version | None = None) -> None:
        """`version`: the stored conversation's, read before `written` was."""
        self.conversation_id = conversation_id
        self._written, self._written_system, self._offset = written, system, 0
        self._version = version

    # -- switching -------------------------------------------------------------------------------

    def start_new(self) -> None:
        """The next message starts a new stored conversation (/clear, /load); this one's cache is
        saved first, so that resuming it later is instant."""
        self.save_state()
        self._attach(None, [], None)

    def resume(self, reference: str) -> tuple[Summary, str]:
        """Make the stored conversation `reference` names the session's; returns it and one line
        on how its next reply starts (from the saved cache, or evaluating it again, and why)."""
        store = self.require()
        summary, conversation, version = store.load_versioned(store.find(reference))
        self.save_state()
        session = self.session
        session.conversation = conversation
        self._attach(summary.id, [_key(m) for m in conversation.messages], conversation.system, version)
        self._state_tokens = []
        cache = session.kv
        if cache is None:
            return summary, "(the server reads the conversation again: its cache is not kept here)"
        cache.forget()  # its tokens were another conversation's
        saved, why = kvstate.load(self._state_path(summary.id), cache.fingerprint(), conversation.messages)
        if saved is not None:
            conversation.messages[:] = [
                dataclasses.replace(m, tokens=tuple(saved.replies[i])) if i in saved.replies else m
                for i, m in enumerate(conversation.messages)]
            if cache.restore(saved.tokens, saved.state):
                self._state_tokens = saved.tokens
                return summary, f"(restored its cache of {len(saved.tokens)} tokens: the next reply starts at once)"
            why = "llama.cpp could not take its saved state"
        return summary, f"(the next reply evaluates the conversation again: {why})"

    def rename(self, title: str) -> int:
        store = self.require()
        try:
            if self.conversation_id is None:
                # Named before its first message: the conversation exists from now on.
                self.conversation_id = store.create(title, self.session.model_name,
                                                    self.session.conversation.system, self.settings)
                self._written_system = self.session.conversation.system
                self._version = store.version(self.conversation_id)
            else:
                store.rename(self.conversation_id, title)
        except StoreError as error:
            self._turn_off(error)
            raise UserError("not renamed") from None
        return self.conversation_id

    def continue_titled(self, title: str) -> None:
        """Make the latest conversation titled `title` the session's, or start one of that title."""
        found = self.require().titled(title)
        if found is None:
            self.rename(title)
        else:
            self.resume(str(found))

    def delete(self, conversation_id: int) -> bool:
        """Delete a stored conversation and its saved cache; True if it was the session's own,
        which then starts afresh."""
        store = self.require()
        if not store.delete(conversation_id):
            raise UserError(f"there is no conversation {conversation_id} (/history lists them)")
        kvstate.remove(self._state_path(conversation_id))
        if conversation_id != self.conversation_id:
            return False
        self._attach(None, [], None)
        return True

    def recent(self, limit: int) -> list[Summary]:
        return self.require().recent(limit)

    # -- the KV cache ----------------------------------------------------------------------------

    def save_state(self) -> None:
        """Save the session's KV cache for its stored conversation. Failing only costs speed."""
        session, cache = self.session, self.session.kv
        if (self.store is None or self.conversation_id is None or cache is None or not cache.tokens
                or cache.tokens == self._state_tokens):
            return
        replies = [(self._offset + index, m) for index, m in enumerate(session.conversation.messages)]
        try:
            tokens, state = cache.state()
            kvstate.save(self._state_path(self.conversation_id), cache.fingerprint(), tokens, state, replies)
            self._state_tokens = tokens
        except (UserError, OSError, RuntimeError) as error:  # RuntimeError: the engine stopped
            if not self._state_problem_told:
                self._state_problem_told = True
                self.notify(f"the conversation's cache was not saved (resuming it will re-read it): {error}")

    def _state_path(self, conversation_id: int) -> Path:
        return kvstate.path_for(self.folder, conversation_id)

    def close(self) -> None:
        self.save_state()
        if self.store is not None:
            self.store.close()

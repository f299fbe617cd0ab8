"""Every conversation, kept as it happens: one SQLite database in the user data folder.

The chat writes each message in its own transaction as soon as it exists, so a crash, a kill or
a lost terminal costs at most the reply being generated. WAL and a busy timeout let several
processes (two chats, the chat and a script) use the database at once. Nothing here knows about
llama.cpp: the web page and remote engines can share the store.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import platformdirs

from gemmachat.conversation import Conversation
from gemmachat.errors import UserError
from gemmachat.safe_io import set_aside
from gemmachat.templates import Message

DATA_ENV = "GEMMA_CHAT_DATA_DIR"
DATABASE_NAME = "conversations.db"
TITLE_LENGTH = 60
BUSY_TIMEOUT_MS = 10_000
# SQLite's integers are 64-bit: a larger id or count is an OverflowError in the driver.
MAX_ID = 2**63 - 1

# Each entry moves the schema one version up (PRAGMA user_version); never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            updated REAL NOT NULL,
            model TEXT NOT NULL DEFAULT '',
            system TEXT,
            settings TEXT NOT NULL DEFAULT '{}'
        )""",
        """CREATE TABLE messages (
            conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            interrupted INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL,
            PRIMARY KEY (conversation, position)
        )""",
        "CREATE INDEX conversations_by_update ON conversations(updated)",
    ),
    # Ids are never given again: a deleted conversation's id (the newest's) went to the next one, and
    # a script's --resume N or a page's #N then reached another conversation. SQLite's own way to
    # change a table: a new one, the rows copied, the old dropped, the new renamed (foreign keys off,
    # so that dropping it deletes no message).
    (
        """CREATE TABLE conversations_v2 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            updated REAL NOT NULL,
            model TEXT NOT NULL DEFAULT '',
            system TEXT,
            settings TEXT NOT NULL DEFAULT '{}'
        )""",
        "INSERT INTO conversations_v2 SELECT id, title, created, updated, model, system, settings FROM conversations",
        "DROP TABLE conversations",
        "ALTER TABLE conversations_v2 RENAME TO conversations",
        "CREATE INDEX conversations_by_update ON conversations(updated)",
    ),
)


class StoreError(UserError):
    """The store cannot be used (a full disk, a read-only folder, a newer schema): one line."""


class ConversationChanged(Exception):
    """Another process changed or deleted the conversation since this writer last wrote it."""


# When a conversation's messages last changed, and how many it has.
Version = tuple[float, int]


@dataclass(frozen=True)
class Summary:
    id: int
    title: str
    created: float
    updated: float
    model: str
    turns: int  # user messages


_SUMMARY = ("SELECT c.id, c.title, c.created, c.updated, c.model, "
            "(SELECT count(*) FROM messages m WHERE m.conversation = c.id AND m.role = 'user') "
            "FROM conversations c")


def data_dir(environ: Mapping[str, str]) -> Path:
    override = environ.get(DATA_ENV)
    return Path(override).expanduser() if override else Path(platformdirs.user_data_dir("gemma-chat"))


def title_from(messages: Sequence[Message]) -> str:
    """The first line of the first user message, trimmed to TITLE_LENGTH characters."""
    for message in messages:
        if message.role == "user":
            line = next((line.strip() for line in message.content.splitlines() if line.strip()), "")
            return line if len(line) <= TITLE_LENGTH else line[:TITLE_LENGTH - 1].rstrip() + "…"
    return ""


def _reason(error: BaseException) -> str:
    return str(getattr(error, "strerror", None) or error)


def _is_damage(error: sqlite3.DatabaseError) -> bool:
    # "file is not a database" and "database disk image is malformed" are plain DatabaseErrors;
    # its subclasses (a locked database, a full disk, a read-only file) are not damage.
    return type(error) is sqlite3.DatabaseError


class Store:
    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection

    @classmethod
    def open(cls, folder: Path, warn: Callable[[str], None]) -> Store:
        """The store in `folder`, created if need be. A damaged database is renamed aside (with one
        line through `warn`) and a new one started; StoreError when none can be used."""
        path = folder / DATABASE_NAME
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # conversations are private
        except FileExistsError:  # mkdir's word for "a file of that name is there": not the reason to show
            raise StoreError(f"cannot use {folder} for the conversations: it is not a folder") from None
        except OSError as error:
            raise StoreError(f"cannot create {folder}: {_reason(error)}") from None
        _private(path)
        try:
            return cls(path, _connect(path))
        except sqlite3.DatabaseError as error:
            if not _is_damage(error):
                raise StoreError(f"cannot use {path}: {_reason(error)}") from None
            damage = _reason(error)
        aside = _set_aside(path)
        warn(f"the conversation store {path} was damaged ({damage}); moved it to {aside.name} and "
             "started a new one")
        try:
            return cls(path, _connect(path))
        except sqlite3.DatabaseError as error:
            raise StoreError(f"cannot use {path}: {_reason(error)}") from None

    @classmethod
    def memory(cls) -> Store:
        """A store that writes nothing to disk and is gone when closed: the server's when it is
        not asked to keep conversations, so that its page works the same, for as long as it runs."""
        return cls(Path(":memory:"), _connect(Path(":memory:")))

    @property
    def kept(self) -> bool:
        return self.path != Path(":memory:")

    def close(self) -> None:
        self._db.close()

    # -- writing ---------------------------------------------------------------------------------

    def create(self, title: str, model: str, system: str | None, settings: Mapping[str, object]) -> int:
        now = time.time()
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO conversations (title, created, updated, model, system, settings) "
                "VALUES (?, ?, ?, ?, ?, ?)", (title, now, now, model, system, json.dumps(dict(settings))))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def write(self, conversation_id: int, start: int, messages: Sequence[Message], system: str | None,
              title: str, expected: Version | None = None) -> Version:
        """Messages from position `start` on become `messages` (what was stored there before goes),
        in one transaction; the title is set if the conversation has none yet. With `expected`, the
        version this writer last saw: ConversationChanged, and nothing written, if another process
        changed or deleted the conversation since (checked inside the transaction, so that no
        write can slip in between). Returns the conversation's new version."""
        now = time.time()
        with self._transaction():
            if expected is not None and self.version(conversation_id) != expected:
                raise ConversationChanged(conversation_id)
            self._db.execute("DELETE FROM messages WHERE conversation = ? AND position >= ?",
                             (conversation_id, start))
            self._db.executemany(
                "INSERT INTO messages (conversation, position, role, content, interrupted, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(conversation_id, start + index, m.role, m.content, int(m.interrupted), now)
                 for index, m in enumerate(messages)])
            self._db.execute(
                "UPDATE conversations SET updated = ?, system = ?, "
                "title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
                (now, system, title, conversation_id))
            version = self.version(conversation_id)
        assert version is not None
        return version

    def rename(self, conversation_id: int, title: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def delete(self, conversation_id: int) -> bool:
        if conversation_id > MAX_ID:
            return False
        with self._transaction():
            self._db.execute("DELETE FROM messages WHERE conversation = ?", (conversation_id,))
            return self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0

    # -- reading ---------------------------------------------------------------------------------

    def recent(self, limit: int = 20) -> list[Summary]:
        rows = self._query(f"{_SUMMARY} ORDER BY c.updated DESC, c.id DESC LIMIT ?", (min(limit, MAX_ID),))
        return [Summary(*row) for row in rows]

    def find(self, reference: str) -> int:
        """The conversation `reference` names: an id, else the latest whose title starts with it,
        else (empty) the latest of all."""
        reference = reference.strip()
        if (reference.isdecimal() and int(reference) <= MAX_ID
                and self._query("SELECT 1 FROM conversations WHERE id = ?", (int(reference),))):
            return int(reference)
        escaped = reference.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._query("SELECT id FROM conversations WHERE title LIKE ? ESCAPE '\\' "
                           "ORDER BY updated DESC, id DESC LIMIT 1", (escaped + "%",))
        if not rows:
            raise UserError(f"no stored conversation is {reference!r} (/history lists them)" if reference
                            else "no conversation is stored yet")
        return rows[0][0]

    def titled(self, title: str) -> int | None:
        """The latest conversation with exactly this title."""
        rows = self._query("SELECT id FROM conversations WHERE title = ? ORDER BY updated DESC, id DESC LIMIT 1",
                           (title,))
        return rows[0][0] if rows else None

    def version(self, conversation_id: int) -> Version | None:
        """When the conversation's messages last changed, and how many there are (None once it is
        deleted): a writer that remembers it sees whether another process wrote in between."""
        rows = self._query("SELECT updated, (SELECT count(*) FROM messages WHERE conversation = ?) "
                           "FROM conversations WHERE id = ?", (conversation_id, conversation_id))
        return (rows[0][0], rows[0][1]) if rows else None

    def load_versioned(self, conversation_id: int) -> tuple[Summary, Conversation, Version | None]:
        """The conversation and the version a write must expect, the version read first: read after
        the messages, it could be of a write they do not hold, which this writer would overwrite."""
        version = self.version(conversation_id)
        summary, conversation = self.load(conversation_id)
        return summary, conversation, version

    def load(self, conversation_id: int) -> tuple[Summary, Conversation]:
        found = self._query(f"{_SUMMARY} WHERE c.id = ?", (conversation_id,))
        if not found:  # the chat names conversations by /history's list first; the page, by its own
            raise UserError(f"there is no conversation {conversation_id}")
        system = self._query("SELECT system FROM conversations WHERE id = ?", (conversation_id,))[0][0]
        rows = self._query("SELECT role, content, interrupted FROM messages WHERE conversation = ? "
                           "ORDER BY position", (conversation_id,))
        messages = [Message(role, content, interrupted=bool(interrupted)) for role, content, interrupted in rows]
        return Summary(*found[0]), Conversation(system=system, messages=messages)

    # -- plumbing --------------------------------------------------------------------------------

    def _query(self, sql: str, parameters: tuple[object, ...]) -> list[tuple]:
        try:
            return self._db.execute(sql, parameters).fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"cannot read {self.path}: {_reason(error)}") from None

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self.path)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; sqlite's errors become StoreError."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db, self.path = db, path

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise StoreError(f"cannot write {self.path}: {_reason(error)}") from None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        if kind is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error as commit_error:
                error = commit_error
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # sqlite rolls back by itself when it cannot
        if isinstance(error, sqlite3.Error):
            raise StoreError(f"cannot write {self.path}: {_reason(error)}") from None


def _private(path: Path) -> None:
    """The database readable by its owner only, an existing one included (SQLite made it 0644, and
    its folder 0755 before gemma-chat made that private): its own files, so nobody else's mode is
    changed. SQLite gives the WAL and shared-memory files the database's mode."""
    try:
        with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600)) as database:
            os.fchmod(database.fileno(), 0o600)
    except OSError:
        pass  # not ours to change (a read-only folder, another owner): opening it says what is wrong


def _connect(path: Path) -> sqlite3.Connection:
    """Open, check and migrate the database; sqlite3.DatabaseError if it is damaged."""
    # Autocommit mode: transactions are explicit (_Transaction), one per message.
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check}")
        db.execute("PRAGMA journal_mode = WAL")
        _migrate(db, path)  # before foreign keys are on: a migration may drop and remake a table
        db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    if db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS):
        return
    # IMMEDIATE: two processes starting at once must not both migrate.
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"{path} was written by a newer gemma-chat (schema {version}; this one "
                             f"knows up to {len(MIGRATIONS)})")
        for number, statements in enumerate(MIGRATIONS[version:], version + 1):
            for statement in statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _set_aside(path: Path) -> Path:
    """Rename a damaged database (and its WAL files) out of the way, keeping it for the user."""
    try:
        return set_aside(path, ("-wal", "-shm"))
    except OSError as error:
        raise StoreError(f"{path} is damaged and cannot be moved aside: {_reason(error)}") from None

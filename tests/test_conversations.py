"""Conversations kept as they happen: the SQLite store, resuming (with the saved KV cache), and the
chat's /history, /resume, /copy, /edit N and toolbar, in a real terminal with the real model."""

from __future__ import annotations

import base64
import os
import re
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pexpect
import pytest

from gemmachat import kvstate
from gemmachat.engine import Engine
from gemmachat.recorder import Recorder
from gemmachat.session import ChatSession
from gemmachat.settings import Sampling, parse_settings
from gemmachat.store import DATABASE_NAME, MIGRATIONS, ConversationChanged, Store, StoreError, title_from
from gemmachat.templates import Message, load_template, render

from test_chat_terminal import Terminal, leave

REPO = Path(__file__).resolve().parent.parent
CPR = re.escape("\x1b[6n")
OSC52 = re.compile("\x1b\\]52;c;([A-Za-z0-9+/=]*)\x07")


def stored(folder: Path) -> list[tuple[int, str, str, int]]:
    """(conversation, role, content, interrupted) of every stored message, in order."""
    with closing(sqlite3.connect(folder / DATABASE_NAME)) as db:
        return db.execute("SELECT conversation, role, content, interrupted FROM messages "
                          "ORDER BY conversation, position").fetchall()


def wait_until_stored(folder: Path, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(stored(folder)) < count:
        assert time.monotonic() < deadline, stored(folder)
        time.sleep(0.1)


# -- the store on its own --------------------------------------------------------------------------

def test_the_schema_is_versioned_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    store = Store.open(tmp_path, pytest.fail)
    number = store.create("t", "model.gguf", "sys", {"temperature": 0})
    store.write(number, 0, [Message("user", "hi"), Message("assistant", "yo", interrupted=True)], "sys", "hi")
    store.close()
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="written by a newer gemma-chat"):
        Store.open(tmp_path, pytest.fail)


def test_an_id_is_never_given_again_and_a_first_schema_store_keeps_its_conversations(tmp_path: Path) -> None:
    # A store as the first schema made it, with two conversations, the second deleted.
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO conversations (id, title, created, updated) VALUES (1, 'kept', 1, 1)")
        db.execute("INSERT INTO messages VALUES (1, 0, 'user', 'still here', 0, 1)")
    db.close()
    store = Store.open(tmp_path, pytest.fail)
    assert [s.title for s in store.recent()] == ["kept"]
    assert store.load(1)[1].messages == [Message("user", "still here")]
    second = store.create("soon gone", "m", None, {})
    assert second == 2 and store.delete(second)
    # The first schema gave the newest deleted id to the next conversation: a script's --resume 2
    # or a page's #2 then reached another one.
    assert store.create("next", "m", None, {}) == 3
    assert store.delete(1)  # and a deleted conversation still takes its messages with it
    store.close()
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 2
    db.close()


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    writer = ("import sys; from pathlib import Path; from gemmachat.store import Store; "
              "from gemmachat.templates import Message\n"
              "store = Store.open(Path(sys.argv[1]), print); number = store.create('other', 'm', None, {})\n"
              "for i in range(300): store.write(number, i, [Message('user', f'other {i}')], None, 'other')\n")
    store = Store.open(tmp_path, pytest.fail)
    other = subprocess.Popen([sys.executable, "-c", writer, str(tmp_path)], cwd=REPO)
    while not store.recent() and other.poll() is None:
        time.sleep(0.01)  # until the other process writes: then both do at once
    mine = store.create("mine", "m", None, {})
    for index in range(300):
        store.write(mine, index, [Message("user", f"mine {index}")], None, "mine")
    assert other.wait(timeout=60) == 0
    contents = [content for _, _, content, _ in stored(tmp_path)]
    assert sorted(contents) == sorted([f"mine {i}" for i in range(300)] + [f"other {i}" for i in range(300)])
    assert {s.title: s.turns for s in store.recent()} == {"mine": 300, "other": 300}


def test_a_write_from_a_stale_version_writes_nothing(tmp_path: Path) -> None:
    # The version is checked inside the write's transaction: what another process wrote in
    # between is never overwritten, whatever the timing.
    chat, page = Store.open(tmp_path, pytest.fail), Store.open(tmp_path, pytest.fail)
    number = chat.create("t", "m", None, {})
    seen = chat.write(number, 0, [Message("user", "a")], None, "t", expected=chat.version(number))
    assert seen == chat.version(number) == (seen[0], 1)
    page.write(number, 1, [Message("assistant", "from the page")], None, "t")
    with pytest.raises(ConversationChanged):
        chat.write(number, 1, [Message("assistant", "from the chat")], None, "t", expected=seen)
    assert [m.content for m in chat.load(number)[1].messages] == ["a", "from the page"]
    page.delete(number)
    with pytest.raises(ConversationChanged):
        chat.write(number, 0, [Message("user", "b")], None, "t", expected=seen)
    chat.close()
    page.close()


def test_a_damaged_database_is_set_aside_with_one_line(tmp_path: Path) -> None:
    (tmp_path / DATABASE_NAME).write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    warnings: list[str] = []
    store = Store.open(tmp_path, warnings.append)
    assert len(warnings) == 1 and "was damaged" in warnings[0] and "started a new one" in warnings[0]
    aside = tmp_path / f"{DATABASE_NAME}.corrupt"
    assert aside.read_bytes().startswith(b"this is not a database")
    assert store.recent() == []
    # A database whose pages are damaged fails the integrity check on open: set aside too.
    for index in range(200):
        store.write(store.create(f"t{index}", "m", None, {}), 0, [Message("user", "x" * 500)], None, "t")
    store.close()
    data = bytearray((tmp_path / DATABASE_NAME).read_bytes())
    data[4096 * 3:4096 * 6] = b"\xff" * (4096 * 3)
    (tmp_path / DATABASE_NAME).write_bytes(bytes(data))
    warnings.clear()
    Store.open(tmp_path, warnings.append).close()
    assert len(warnings) == 1 and "was damaged" in warnings[0]
    # Both damaged copies are kept (the second used to replace the first within the same second).
    assert aside.read_bytes().startswith(b"this is not a database")
    assert (tmp_path / f"{DATABASE_NAME}.corrupt-2").read_bytes()[4096 * 3:4096 * 4] == b"\xff" * 4096


def test_an_unusable_folder_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot create .*file/data: Not a directory"):
        Store.open(tmp_path / "file" / "data", pytest.fail)
    # mkdir's own words for a file or a device in the folder's place were "File exists".
    for not_a_folder in (tmp_path / "file", Path("/dev/null")):
        with pytest.raises(StoreError, match=f"^cannot use {not_a_folder} for the conversations: it is not a folder$"):
            Store.open(not_a_folder, pytest.fail)


def test_the_folder_made_for_conversations_is_private(tmp_path: Path) -> None:
    # Other users of the machine could read every conversation in it (it was 0755, the database 0644).
    folder = tmp_path / "new" / "gemma-chat"
    Store.open(folder, pytest.fail).close()
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / DATABASE_NAME).stat().st_mode & 0o777 == 0o600
    # A database an earlier gemma-chat left readable by all becomes its owner's.
    (folder / DATABASE_NAME).chmod(0o644)
    Store.open(folder, pytest.fail).close()
    assert (folder / DATABASE_NAME).stat().st_mode & 0o777 == 0o600


def test_titles_come_from_the_first_user_line() -> None:
    assert title_from([Message("system", "s"), Message("user", "\n  Why is the sky blue?  \nmore")]) == \
        "Why is the sky blue?"
    assert len(title_from([Message("user", "word " * 40)])) == 60
    assert title_from([Message("assistant", "a")]) == ""


def test_history_is_a_flag_and_a_config_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("history = false\n")
    assert parse_settings([], {"GEMMA_CHAT_CONFIG": str(config)}).keep_history is False
    assert parse_settings(["--history"], {"GEMMA_CHAT_CONFIG": str(config)}).keep_history is True
    assert parse_settings(["--no-history"], {}).keep_history is False


# -- the recorder on the real engine ----------------------------------------------------------------

def session_for(engine: Engine) -> ChatSession:
    template = load_template("gemma")
    return ChatSession(engine, lambda system, messages, generation=True: render(template, system, messages, generation),
                       Sampling(temperature=0), n_predict=8)


def chat_settings(folder: Path):
    return parse_settings(["--chat"], {"GEMMA_CHAT_DATA_DIR": str(folder)})


def recording(engine: Engine, folder: Path) -> tuple[ChatSession, Recorder, list[str]]:
    """A session on the real engine, its recorder keeping it in `folder`, and the lines it tells."""
    session = session_for(engine)
    told: list[str] = []
    return session, Recorder.open(session, chat_settings(folder), told.append), told


def test_resuming_restores_the_cache_only_for_the_same_engine(engine: Engine, tmp_path: Path) -> None:
    session = session_for(engine)
    recorder = Recorder.open(session, chat_settings(tmp_path), pytest.fail)
    for text in ("Hello there.", "Tell me about the sea."):
        session.say(text)
        recorder.sync()
        "".join(session.respond())
        recorder.sync()
    recorder.close()
    conversation_id = recorder.conversation_id
    # A new session (as a new process would have) continues it from the saved cache...
    again = session_for(engine)
    recorder = Recorder.open(again, chat_settings(tmp_path), pytest.fail)
    summary, how = recorder.resume(str(conversation_id))
    assert summary.turns == 2 and "restored its cache" in how
    again.say("And the mountains?")
    "".join(again.respond())
    stats = again.last_stats
    assert stats.reused_tokens > 30 and stats.evaluated_tokens < 20, stats
    # ...but not with another engine's cache layout: then it says why and evaluates it all.
    session_for(engine)  # leaves the sequence to another conversation
    original = engine.state_fingerprint
    engine.state_fingerprint = lambda: original() + "|other"  # type: ignore[method-assign]
    try:
        _, how = recorder.resume(str(conversation_id))
    finally:
        del engine.state_fingerprint
    assert "evaluates the conversation again: the model or the settings" in how
    recorder.close()


def test_a_full_disk_turns_storing_off_with_one_line_and_keeps_the_chat(engine: Engine, tmp_path: Path) -> None:
    session, recorder, told = recording(engine, tmp_path)
    session.say("First.")
    recorder.sync()
    assert recorder.store is not None
    # SQLite's own "database or disk is full", as on a full disk.
    recorder.store._db.execute("PRAGMA max_page_count = 1")
    session.say("Second " * 2000)
    recorder.sync()
    session.conversation.messages.pop()
    session.say("Third.")
    recorder.sync()
    assert len(told) == 1 and "no longer kept" in told[0] and "full" in told[0], told
    assert "".join(session.respond()), "the chat goes on"
    assert [m.content for m in session.conversation.messages][:2] == ["First.", "Third."]
    assert [content for _, _, content, _ in stored(tmp_path)] == ["First."]


def test_a_conversation_changed_elsewhere_is_not_overwritten(engine: Engine, tmp_path: Path) -> None:
    session, recorder, told = recording(engine, tmp_path)
    session.say("Hello.")
    recorder.sync()
    "".join(session.respond())
    recorder.sync()
    first = recorder.conversation_id
    # The chat page (the server: another connection, maybe another process) goes on with it...
    page = Store.open(tmp_path, pytest.fail)
    page.write(first, 2, [Message("user", "From the page."), Message("assistant", "Page reply.")], None, "Hello.")
    # ...so the chat's next message goes to a new conversation instead of over the page's.
    session.say("From the terminal.")
    recorder.sync()
    assert len(told) == 1 and f"conversation {first} was changed elsewhere" in told[0], told
    second = recorder.conversation_id
    assert second != first
    rows = stored(tmp_path)
    assert [c for n, _, c, _ in rows if n == first][2:] == ["From the page.", "Page reply."]
    assert [c for n, r, c, _ in rows if n == second and r == "user"] == ["Hello.", "From the terminal."]
    # Its own writes do not count as changes made elsewhere.
    "".join(session.respond())
    recorder.sync()
    assert len(told) == 1 and recorder.conversation_id == second
    page.close()
    recorder.close()


# -- the program -----------------------------------------------------------------------------------

class CprTerminal(Terminal):
    """A terminal that answers prompt_toolkit's cursor position requests, as a real one does:
    without the answer it cannot tell the height below the prompt, and shows no toolbar."""

    def expect(self, pattern, timeout=-1, **kwargs):  # type: ignore[no-untyped-def, override]
        patterns = [CPR] + (pattern if isinstance(pattern, list) else [pattern])
        while True:
            index = super().expect(patterns, timeout=timeout, **kwargs)
            if index:
                return index - 1
            self.send("\x1b[1;1R")


def open_chat(env: dict[str, str], *args: str) -> CprTerminal:
    return CprTerminal(sys.executable, ["-m", "gemmachat", "--chat", "-c", "2048", "--nologo", *args], env=env,
                       encoding="utf-8", timeout=60, dimensions=(40, 120), cwd=REPO)


@pytest.fixture
def env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**cli_env, "GEMMA_CHAT_DATA_DIR": str(tmp_path / "data")}


def test_a_reply_that_fills_the_context_leaves_the_chat_running(env: dict[str, str]) -> None:
    # Before, the toolbar's count of the conversation, over the context now, ended the chat (exit 2),
    # and so did every later --resume of that conversation.
    child = open_chat(env, "-c", "256", "-n", "-1")
    child.expect(">>>")
    child.send_line("Count from one to one hundred: one, two, three,")
    child.expect(">>>", timeout=90)
    for resumed in (False, True):
        child.send_line("/context")
        child.expect("more than the 256 tokens it holds")
        child.expect("context: over 256/256 tokens")  # the toolbar
        leave(child)
        if not resumed:
            child = open_chat(env, "-c", "256", "--resume")
            child.expect(">>>")


def test_killed_mid_reply_then_resumed_in_a_terminal(env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    child = open_chat(env, "-n", "6")
    child.expect(">>>")
    child.send_line("Hello from the first turn")
    child.expect(">>>")
    child.send_line("/set n_predict 600")
    child.expect(">>>")
    child.send_line("Write a very long story about the sea.")
    wait_until_stored(data, 3)  # the message is kept before its reply starts...
    time.sleep(1)  # ...which is then under way: 600 tokens take 10 s and more here
    child.kill(9)
    child.close()
    messages = stored(data)
    # Every message before the kill, and only the reply being written lost.
    assert [(role, content) for _, role, content, _ in messages][::2] == [
        ("user", "Hello from the first turn"), ("user", "Write a very long story about the sea.")]
    assert len(messages) == 3
    first_reply = messages[1][2]

    child = open_chat(env, "-n", "6", "--resume")
    child.expect("conversation 1: Hello from the first turn")
    for _, role, content, _ in messages:
        # A reply is shown as Markdown: look for its first word, which rendering leaves alone.
        shown = content if role == "user" else (re.search(r"\w{3,}", content) or re.search(".*", content))[0]
        child.expect(re.escape(shown))
    child.expect("no saved state")
    child.expect("no reply: /retry writes one")
    child.expect(">>>")
    # /copy: the last reply, through OSC 52.
    child.send_line("/copy")
    child.expect(OSC52)
    assert base64.b64decode(child.match.group(1)).decode("utf-8") == first_reply
    child.expect("copied the last reply")
    child.send_line("/retry")
    child.expect(">>>")
    # The toolbar's numbers are /context's and /stats'.
    child.send_line("/context")
    child.expect(r"context: (\d+) tokens used, \d+ free, (\d+) total")
    context = child.match.groups()
    child.send_line("/stats")
    child.expect(r"tokens generated at ([\d.]+) tokens/s")
    speed = child.match.group(1)
    child.expect(r"context: (\d+)/(\d+) tokens · last reply: ([\d.]+) tokens/s")
    assert child.match.groups() == (*context, speed)
    # A second conversation, then back to the first: its cache was saved when it was left.
    child.send_line("/clear")
    child.expect(">>>")
    child.send_line("Another topic")
    child.expect(">>>")
    child.send_line("/history")
    child.expect(r"\* +2 .* +1 +gemma-3-270m.* Another topic")
    child.expect(r"  +1 .* +2 +gemma-3-270m.* Hello from the first turn")
    child.send_line("/resume 1")
    child.expect("conversation 1: Hello from the first turn")
    child.expect("restored its cache of")
    child.expect(">>>")
    # /edit N puts the message in the prompt; what is sent replaces it and what followed.
    child.send_line("/edit 1")
    child.expect("editing message 1")
    child.expect(">>> Hello from the first turn")
    child.send_line(", edited")
    child.expect(">>>")
    child.send_line("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert [(number, role, content) for number, role, content, _ in stored(data)][::2] == [
        (1, "user", "Hello from the first turn, edited"), (2, "user", "Another topic")]
    assert len(stored(data)) == 4


def test_edit_resends_a_changed_message_and_drops_what_followed(run_cli, env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("--chat", "-n", "4", input="One\nTwo\nThree\n/edit 2\nTwo, changed\n/history\n", env=env)
    assert result.returncode == 0, result.stderr
    assert "editing message 2: sending replaces it and drops the 3 message(s) after it" in result.stdout
    assert [(role, content) for _, role, content, _ in stored(tmp_path / "data")][::2] == [
        ("user", "One"), ("user", "Two, changed")]


def test_a_damaged_store_and_no_history(run_cli, env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / DATABASE_NAME).write_bytes(b"\x00garbage" * 1000)
    result = run_cli("--chat", "-n", "3", input="Still answering?\n", env=env)
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr
    assert result.stdout.count("was damaged") == 1 and "started a new one" in result.stdout
    assert [content for _, _, content, _ in stored(data)][0] == "Still answering?"
    # --no-history: nothing stored, nothing created.
    fresh = {**env, "GEMMA_CHAT_DATA_DIR": str(tmp_path / "fresh")}
    result = run_cli("--chat", "-n", "3", "--no-history", input="Not kept\n/history\n", env=fresh)
    assert result.returncode == 1 and "conversations are not kept (--no-history)" in result.stderr
    assert not (tmp_path / "fresh" / DATABASE_NAME).exists()


def test_ids_and_counts_past_sqlites_integers_are_plain_answers(run_cli, env: dict[str, str]) -> None:
    # Numbers SQLite cannot hold were an OverflowError: a traceback, and the chat ended.
    huge = "9" * 23
    result = run_cli("--chat", "-n", "2", input=f"Hello\n/history {huge}\n/resume {huge}\n/delete {huge}\n"
                     "/history 0\n/history \u00b2\n/history\n", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert f"no stored conversation is '{huge}'" in result.stderr
    assert f"there is no conversation {huge}" in result.stderr
    assert result.stderr.count("usage: /history [COUNT] (COUNT: 1 or more)") == 2  # 0, and "²" ("²".isdigit())
    assert len(re.findall(r"^\*\s+1\s.*Hello$", result.stdout, re.M)) == 2, result.stdout  # both /history
    cli = run_cli("--cli", "--resume", huge, "-p", "x", env=env)
    assert cli.returncode == 2 and cli.stderr == f"gemma-chat: no stored conversation is '{huge}' (/history lists them)\n"


def test_cli_holds_a_conversation_across_calls(run_cli, env: dict[str, str], tmp_path: Path) -> None:
    def ask(*args: str) -> subprocess.CompletedProcess:
        result = run_cli("--cli", "--temp", "0", "-n", "6", *args, env=env)
        assert result.returncode == 0, result.stderr
        return result

    first = ask("--save-to", "notes", "-p", "My name is Ann.")
    ask("--save-to", "notes", "-p", "What is my name?")
    third = ask("--resume", "not", "-p", "Say it again.", "--verbose")
    assert "restored its cache" in third.stderr
    rows = stored(tmp_path / "data")
    assert {number for number, *_ in rows} == {1}
    assert [content for _, role, content, _ in rows if role == "user"] == [
        "My name is Ann.", "What is my name?", "Say it again."]
    assert rows[1][2] == first.stdout
    refused = run_cli("--cli", "--resume", "--no-history", "-p", "x", env=env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1


def test_cli_calls_at_once_on_one_conversation_take_turns(env: dict[str, str], tmp_path: Path) -> None:
    # Each call had read the conversation while another's message waited for its reply, then went
    # on as a new conversation: "notes" was left with messages nobody answered, one after another.
    first = subprocess.run([sys.executable, "-m", "gemmachat", "--cli", "--save-to", "notes", "-p", "start",
                            "-n", "2"], env=env, cwd=REPO, capture_output=True, timeout=120)
    assert first.returncode == 0, first.stderr
    calls = [subprocess.Popen([sys.executable, "-m", "gemmachat", "--cli", "--save-to", "notes", "-p",
                               f"message {number}", "-n", "2"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for number in range(4)]
    waited = 0
    for call in calls:
        _, error = call.communicate(timeout=240)
        assert call.returncode == 0, error
        # Nothing but, for a call that had to wait, a line saying so (it looked hung).
        assert error in (b"", b"gemma-chat: waiting for another gemma-chat call to finish its turn in the stored "
                              b"conversations\n"), error
        waited += bool(error)
    assert waited, "four calls at once: some waited"
    rows = stored(tmp_path / "data")
    assert {number for number, *_ in rows} == {1}, "no call went on as a new conversation"
    assert [role for _, role, _, _ in rows] == ["user", "assistant"] * 5
    assert sorted(content for _, role, content, _ in rows if role == "user") == [
        *(f"message {number}" for number in range(4)), "start"]


def test_only_the_latest_saved_caches_are_kept(tmp_path: Path) -> None:
    for number in range(kvstate.KEPT_STATES + 3):
        kvstate.save(kvstate.path_for(tmp_path, number), "same", [1, 2], b"state", [])
        os.utime(kvstate.path_for(tmp_path, number), (number, number))  # saved in this order
    kept = sorted(int(path.stem) for path in (tmp_path / "kv").iterdir())
    assert kept == list(range(3, kvstate.KEPT_STATES + 3))
    saved, why = kvstate.load(kvstate.path_for(tmp_path, 5), "other", [])
    assert saved is None and "changed" in why
    kvstate.path_for(tmp_path, 5).write_bytes(kvstate.MAGIC + b"{broken\n")
    assert kvstate.load(kvstate.path_for(tmp_path, 5), "same", []) == (None, "its saved state is damaged")

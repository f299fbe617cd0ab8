"""The server's conversation API (gemmachat/server/conversations_routes.py), over plain HTTP
against a real server on the real model, sharing its store with the terminal chat's `--cli
--save-to/--resume`."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from test_conversations import stored
from test_server import ServerProcess

from gemmachat.conversation import Conversation
from gemmachat.store import DATABASE_NAME, Store
from gemmachat.templates import Message

GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def server(server_env: dict[str, str], data: Path, model_path: Path) -> Iterator[ServerProcess]:
    running = ServerProcess({**server_env, "GEMMA_CHAT_DATA_DIR": str(data)}, "--history")
    yield running
    running.stop()


class Stream:
    """A streamed reply, read event by event as it comes."""

    def __init__(self, port: int, path: str, body: dict[str, Any]) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.read()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for line in self.response:
            if line.startswith(b"data: "):
                yield json.loads(line[6:])

    def close(self) -> None:
        self.connection.close()


def converse(server: ServerProcess, path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The whole streamed reply and its last event."""
    stream = Stream(server.port, path, body)
    try:
        events = list(stream)
    finally:
        stream.close()
    assert events[0]["type"] == "start" and events[-1]["type"] == "done", events
    return "".join(e["text"] for e in events if e["type"] == "text"), events[-1]


def written_elsewhere(data: Path, number: int, position: int, text: str) -> None:
    """A user message written into conversation `number` as the terminal chat's recorder writes it:
    from another process on the same store, expecting the version it reads."""
    terminal = Store.open(data, pytest.fail)
    terminal.write(number, position, [Message("user", text)], None, "", expected=terminal.version(number))
    terminal.close()


def new(server: ServerProcess, **fields: Any) -> dict[str, Any]:
    status, created = server.request("POST", "/conversations", fields)
    assert status == 201, created
    return created


def test_the_message_is_kept_at_once_and_the_reply_when_it_ends(server: ServerProcess, data: Path) -> None:
    number = new(server, system="Be brief.")["id"]
    stream = Stream(server.port, f"/conversations/{number}/messages",
                    {"content": "Count: 1, 2, 3,", "temperature": 0, "max_tokens": 24})
    try:
        events = iter(stream)
        assert next(events) == {"type": "start", "position": 1, "dropped": 0}
        first = next(events)
        assert first["type"] == "text"
        # Mid-reply: the user's message is stored, the reply is not yet.
        assert [(role, content) for n, role, content, _ in stored(data) if n == number] == [("user", "Count: 1, 2, 3,")]
        rest = list(events)
    finally:
        stream.close()
    done = rest[-1]
    reply = first["text"] + "".join(e["text"] for e in rest if e["type"] == "text")
    assert done["type"] == "done" and done["generated_tokens"] > 1 and done["tokens_per_second"] > 0
    assert done["context"]["used"] == done["prompt_tokens"] + done["generated_tokens"]
    status, conversation = server.request("GET", f"/conversations/{number}")
    assert status == 200 and conversation["system"] == "Be brief." and conversation["title"] == "Count: 1, 2, 3,"
    assert conversation["messages"] == [{"role": "user", "content": "Count: 1, 2, 3,", "interrupted": False},
                                        {"role": "assistant", "content": reply, "interrupted": False}]
    assert done["context"]["used"] <= conversation["context"]["used"] < conversation["context"]["size"]


def test_a_stopped_reply_is_kept_and_marked_interrupted(server: ServerProcess, data: Path) -> None:
    number = new(server)["id"]
    stream = Stream(server.port, f"/conversations/{number}/messages",
                    {"content": "Once upon a time", "temperature": 0, "max_tokens": 200})
    events = iter(stream)
    seen = "".join(next(events).get("text", "") for _ in range(4))
    # While it writes, a rename is fine; what would take the conversation from under the reply is 409.
    assert server.request("PATCH", f"/conversations/{number}", {"title": "renamed mid-reply"})[0] == 200
    for method, path, body in (("PATCH", f"/conversations/{number}", {"system": "Be terse."}),
                               ("DELETE", f"/conversations/{number}", None),
                               ("POST", f"/conversations/{number}/messages", {"content": "again"})):
        status, answer = server.request(method, path, body)
        assert status == 409 and answer["error"]["code"] == "conversation_busy", (method, path, answer)
    stream.close()  # as the page's stop button does
    deadline = time.monotonic() + 30
    while not [row for row in stored(data) if row[0] == number and row[1] == "assistant"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    _, role, content, interrupted = stored(data)[-1]
    assert role == "assistant" and interrupted == 1 and content.startswith(seen) and len(content) < 2000
    status, conversation = server.request("GET", f"/conversations/{number}")
    assert conversation["messages"][-1]["interrupted"] is True and not conversation["writing"]
    assert server.request("GET", "/health")[1]["slots_processing"] == 0


def test_a_reply_to_a_conversation_the_terminal_wrote_meanwhile_goes_to_a_new_one(server: ServerProcess,
                                                                                 data: Path) -> None:
    number = new(server)["id"]
    stream = Stream(server.port, f"/conversations/{number}/messages",
                    {"content": "Count: 1, 2, 3,", "temperature": 0, "max_tokens": 12})
    try:
        events = iter(stream)
        assert next(events)["type"] == "start"
        # The reply is under way (it is stored when it ends): the terminal chat, another process on
        # the same store, goes on with the conversation meanwhile, as its recorder writes.
        written_elsewhere(data, number, 1, "typed in the terminal")
        rest = list(events)
    finally:
        stream.close()
    done = rest[-1]
    reply = "".join(e["text"] for e in rest if e["type"] == "text")
    assert done["type"] == "done" and done["conversation"] not in (number, None), done
    # Nothing the terminal wrote is overwritten; the reply is kept, in a new conversation.
    original = server.request("GET", f"/conversations/{number}")[1]["messages"]
    assert [(m["role"], m["content"]) for m in original] == [("user", "Count: 1, 2, 3,"),
                                                             ("user", "typed in the terminal")]
    forked = server.request("GET", f"/conversations/{done['conversation']}")[1]["messages"]
    assert [(m["role"], m["content"]) for m in forked] == [("user", "Count: 1, 2, 3,"), ("assistant", reply)]
    assert reply
    deadline = time.monotonic() + 10  # the server's log says so too (read from its stderr as it comes)
    while not server.log_lines(f"the reply went on as conversation {done['conversation']}"):
        assert time.monotonic() < deadline, server.lines[-5:]
        time.sleep(0.05)


def test_regenerate_and_edit_and_resend(server: ServerProcess) -> None:
    number = new(server)["id"]
    converse(server, f"/conversations/{number}/messages", {"content": "Roses are red,", **GREEDY})
    converse(server, f"/conversations/{number}/messages", {"content": "Violets are", **GREEDY})
    again, _ = converse(server, f"/conversations/{number}/reply", {"temperature": 0, "max_tokens": 3})
    messages = server.request("GET", f"/conversations/{number}")[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == again
    # Edit the last user message: it and what followed give way.
    converse(server, f"/conversations/{number}/messages", {"content": "Tulips are", "at": 2, **GREEDY})
    messages = server.request("GET", f"/conversations/{number}")[1]["messages"]
    assert [m["content"] for m in messages[::2]] == ["Roses are red,", "Tulips are"] and len(messages) == 4
    status, error = server.request("POST", f"/conversations/{number}/messages", {"content": "x", "at": 1})
    assert status == 400 and "not a user message" in error["error"]["message"]


def test_rename_delete_export_and_import(server: ServerProcess) -> None:
    number = new(server, title="draft")["id"]
    converse(server, f"/conversations/{number}/messages", {"content": "Hello there", **GREEDY})
    status, renamed = server.request("PATCH", f"/conversations/{number}", {"title": "Greeting", "system": "Be kind."})
    assert status == 200 and renamed["title"] == "Greeting" and renamed["system"] == "Be kind."
    status, exported = server.request("GET", f"/conversations/{number}/export")
    assert status == 200
    loaded = Conversation.from_document(exported, "export")  # what /load reads
    assert loaded.system == "Be kind." and [m.content for m in loaded.messages][0] == "Hello there"
    status, imported = server.request("POST", "/conversations/import", loaded.to_json())
    assert status == 201 and imported["id"] != number and imported["title"] == "Hello there"
    assert [m["content"] for m in imported["messages"]] == [m.content for m in loaded.messages]
    assert server.request("DELETE", f"/conversations/{number}")[0] == 204
    status, error = server.request("GET", f"/conversations/{number}")
    assert status == 404 and error["error"]["message"] == f"there is no conversation {number}"
    status, error = server.request("POST", "/conversations/import", '{"format": "something else"}')
    assert status == 400 and error["error"]["message"] == "cannot load the upload: not a gemma-chat conversation"
    ids = [c["id"] for c in server.request("GET", "/conversations")[1]["data"]]
    assert imported["id"] in ids and number not in ids


def test_the_terminal_and_the_server_continue_each_others_conversations(
        server: ServerProcess, data: Path, run_cli) -> None:
    env = {"GEMMA_CHAT_DATA_DIR": str(data)}
    made = run_cli("--cli", "--temp", "0", "-n", "4", "--save-to", "terminal notes", "-p", "My name is Ann.", env=env)
    assert made.returncode == 0, made.stderr
    listing = server.request("GET", "/conversations")[1]
    assert listing["kept"] and str(data / DATABASE_NAME) in listing["where"]
    found = next(c for c in listing["data"] if c["title"] == "terminal notes")
    converse(server, f"/conversations/{found['id']}/messages", {"content": "What is my name?", **GREEDY})
    # ... and the terminal goes on with what the page wrote.
    resumed = run_cli("--cli", "--temp", "0", "-n", "4", "--resume", str(found["id"]), "-p", "Again?", env=env)
    assert resumed.returncode == 0, resumed.stderr
    rows = [(role, content) for n, role, content, _ in stored(data) if n == found["id"]]
    assert [content for role, content in rows if role == "user"] == ["My name is Ann.", "What is my name?", "Again?"]
    assert [role for role, _ in rows] == ["user", "assistant"] * 3 and rows[-1][1] == resumed.stdout


def test_server_keeps_nothing_unless_asked_and_the_key_guards_the_api_not_the_page(
        server_env: dict[str, str], tmp_path: Path, model_path: Path) -> None:
    running = ServerProcess({**server_env, "GEMMA_CHAT_DATA_DIR": str(tmp_path)}, "--api-key", "sesame")
    try:
        status, page = running.request("GET", "/")
        assert status == 200 and "<html" in page
        assert running.request("GET", "/conversations")[0] == 401
        key = {"Authorization": "Bearer sesame"}
        status, created = running.request("POST", "/conversations", {}, headers=key)
        assert status == 201
        listing = running.request("GET", "/conversations", headers=key)[1]
        assert not listing["kept"] and "--history" in listing["where"] and listing["data"][0]["id"] == created["id"]
    finally:
        running.stop()
    assert list(tmp_path.iterdir()) == []


def test_a_write_against_a_version_changed_since_is_409(server: ServerProcess, data: Path) -> None:
    number = new(server)["id"]
    shown = server.request("GET", f"/conversations/{number}")[1]["version"]
    written_elsewhere(data, number, 0, "from the terminal")
    for path, body in [(f"/conversations/{number}/messages", {"content": "Hi", "max_tokens": 1, "version": shown}),
                       (f"/conversations/{number}/reply", {"max_tokens": 1, "version": shown})]:
        status, reply = server.request("POST", path, body)
        assert status == 409 and reply["error"]["code"] == "conversation_changed", reply
    assert [content for n, _, content, _ in stored(data) if n == number] == ["from the terminal"]
    # The version read now is taken; one the server never gave is not.
    current = server.request("GET", f"/conversations/{number}")[1]["version"]
    assert current != shown
    status, events = server.request("POST", f"/conversations/{number}/reply", {"max_tokens": 1, "version": current})
    assert status == 200 and '"type":"done"' in events, events
    assert server.request("POST", f"/conversations/{number}/reply", {"max_tokens": 1, "version": "x"})[0] == 409

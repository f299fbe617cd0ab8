"""Slash commands end to end, through the real program with piped input and the real model.

Each test reads what the conversation holds from `/dump FILE` (the exact prompt text), so it
checks what the model would see, not only what was printed.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_chat_terminal import leave, open_chat

from gemmachat.commands import UPLOAD_LIMIT_BYTES


SYSTEM = "Be brief."


def chat(run_cli, script: str, *args: str, env: dict[str, str] | None = None, refused: bool = False):
    """The piped chat; `refused`: a line of the script is meant to fail, and the exit status says so."""
    result = run_cli("--chat", "-n", "6", "-p", SYSTEM, *args, input=script, env=env)
    assert result.returncode == (1 if refused else 0), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return result


def turns(dump: Path) -> list[str]:
    """The turns of a /dump file as "role\ntext", without the system prompt that opens the first
    user turn (the official Gemma 3 format)."""
    text = dump.read_text(encoding="utf-8").replace(f"user\n{SYSTEM}\n\n", "user\n", 1)
    return [part.split("<end_of_turn>")[0].strip() for part in text.split("<start_of_turn>")[1:]]


def test_retry_replaces_the_last_reply_and_needs_one(run_cli, tmp_path: Path) -> None:
    dump = tmp_path / "dump.txt"
    result = chat(run_cli, f"/retry\nWhat is a cat?\n/retry\n/dump {dump}\n/stats\n", refused=True)
    assert "gemma-chat: there is no reply to retry" in result.stderr
    roles = [turn.split("\n")[0] for turn in turns(dump)]
    assert roles == ["user", "model"], "retry keeps one reply, not two"
    # Two replies were generated (the first and its retry): the session totals count both.
    assert "session: 2 replies" in result.stdout


def test_upload_shares_text_and_refuses_binary_huge_and_missing_files(run_cli, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("The secret word is marmalade.\n", encoding="utf-8")
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    huge = tmp_path / "huge.txt"
    huge.write_text("a" * (UPLOAD_LIMIT_BYTES + 1))
    dump = tmp_path / "dump.txt"
    result = chat(run_cli, f"/upload {binary}\n/upload {huge}\n/upload {tmp_path / 'nope.txt'}\n"
                           f"/upload\n/upload {notes}\n/dump {dump}\n", refused=True)
    refusals = result.stderr
    assert f"{binary} is not a text file" in refusals
    assert f"{huge} is {len(huge.read_bytes()) // 1024} KiB; /upload takes text files up to" in refusals
    assert "cannot read" in refusals and "nope.txt" in refusals
    assert "usage: /upload FILE" in refusals
    assert "uploaded notes.txt" in result.stdout
    assert turns(dump) == ["user\nnotes.txt:\n```\nThe secret word is marmalade.\n```"], \
        "only the text file reaches the conversation, and no reply is asked for"


def test_edit_sends_what_the_editor_wrote(run_cli, cli_env: dict[str, str], tmp_path: Path) -> None:
    # A real editor process in a real terminal: a shell that writes the message into the file it is given.
    editor = "sh -c 'printf \"Written in the editor\\nsecond line\\n\" > \"$1\"' editor"
    dump = tmp_path / "dump.txt"
    child = open_chat(cli_env, "--chat", "-n", "4", "-p", SYSTEM, env={"EDITOR": editor, "VISUAL": ""})
    child.expect(">>>")
    child.send_line("/edit")
    child.expect(">>>")
    child.send_line(f"/dump {dump}")
    child.expect("wrote")
    leave(child)
    assert turns(dump)[0] == "user\nWritten in the editor\nsecond line"
    assert turns(dump)[1].startswith("model"), "the edited message got a reply"
    for other_editor, said in [("sh -c ': > \"$1\"' editor", "nothing sent"),
                               (str(tmp_path / "no-such-editor"), "cannot run the editor")]:
        child = open_chat(cli_env, "--chat", "-n", "4", env={"EDITOR": other_editor, "VISUAL": ""})
        child.expect(">>>")
        child.send_line("/edit")
        child.expect(said)
        leave(child)
    # Piped, there is no terminal for an editor (vi wrote its screen into the output), and an
    # argument that is not a number is no longer text for it.
    result = chat(run_cli, "First\n/edit\n/edit -1\n/edit 1 new text\n", env={"EDITOR": editor}, refused=True)
    assert result.stderr.splitlines() == [
        "gemma-chat: /edit alone opens an editor, which needs a terminal: in a script, send the message as a line",
        *["gemma-chat: usage: /edit [N] (N: the number of one of your messages, from 1)"] * 2], result.stderr
    assert "Written in the editor" not in result.stdout


def test_checkpoints_forget_system_and_settings(run_cli, tmp_path: Path) -> None:
    dump = tmp_path / "dump.txt"
    result = chat(run_cli, "\n".join([
        "First question?", "/push", "/stack", "Second question?", "/undo 3", "/pop", "/pop",
        "/system You are a pirate.", "/show system", "/forget", f"/dump {dump}",
        "/set temp 0.5", "/set parameter top_k 7", "/set top_k many", "/set temp nan", "/set colour red",
        "/show settings",
        "/show model", "/halp", "/help undo",
    ]) + "\n", refused=True)
    out, refusals = result.stdout, result.stderr
    assert "checkpoint 1 saved" in out and "back to checkpoint 1" in out
    assert "no checkpoint to go back to" in out and "/undo takes no argument" in refusals
    assert "You are a pirate." in out
    assert "forgot the oldest user message" in out
    # After /pop the second exchange is gone; /forget dropped the first question; the new system
    # prompt opens the first user turn (the official Gemma 3 format).
    remaining = turns(dump)
    assert len(remaining) == 1 and remaining[0].startswith("model\nYou are a pirate.\n\n"), remaining
    assert "temperature = 0.5" not in out and "temp = 0.5" in out
    assert "'many' is not a valid value for top_k" in refusals and "'nan' is not a valid value for temp" in refusals
    assert "unknown setting 'colour'" in refusals
    settings = {line.split()[0]: line.split()[1] for line in out.splitlines()
                if line.startswith("  ") and len(line.split()) == 2}
    assert settings["temperature"] == "0.5" and settings["top_k"] == "7"
    assert "architecture" in out and "gemma3" in out
    assert "unknown command /halp; did you mean /help?" in refusals
    assert "/undo\n  drop the last exchange" in out


def test_save_writes_a_versioned_file_loadable_in_a_new_process(run_cli, tmp_path: Path) -> None:
    saved = tmp_path / "deep" / "chat.json"
    saved.parent.mkdir()
    chat(run_cli, f"Hello 😀 日本\n/save {saved}\n")
    document = json.loads(saved.read_text(encoding="utf-8"))
    assert document["format"] == "gemma-chat conversation" and document["version"] == 1
    assert document["messages"][0]["content"] == "Hello 😀 日本"
    assert not list(saved.parent.glob("*.tmp*")), "no temporary file left beside the saved one"
    dump = tmp_path / "dump.txt"
    chat(run_cli, f"/load {saved}\n/dump {dump}\n")
    assert document["system"] == SYSTEM
    assert turns(dump)[0] == "user\nHello 😀 日本"


def test_set_format_holds_replies_to_json_or_a_schema(run_cli, tmp_path: Path) -> None:
    dump = tmp_path / "dump.json"
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    result = run_cli("--chat", "-n", "120", "--temp", "1", "--seed", "5", input="\n".join([
        "/set format json", "Describe a cat.", f"/save {dump}",
        f"/set format {json.dumps(schema)}", "Is the sky blue?", f"/save {dump}.2",
        '/set format {"type": "integer", "minimum": 1}', "/set format text", "/show settings",
    ]) + "\n")
    assert result.returncode == 1, result.stderr  # the schema with "minimum" is refused
    first = json.loads(dump.read_text())["messages"][-1]["content"]
    assert isinstance(json.loads(first), dict), first
    second = json.loads(Path(f"{dump}.2").read_text())["messages"][-1]["content"]
    assert json.loads(second) in ({"answer": "yes"}, {"answer": "no"}), second
    assert "'minimum'" in result.stdout + result.stderr
    assert "format             text" in result.stdout

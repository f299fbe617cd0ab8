"""Hostile paths for the files gemma-chat reads and writes, through the real program: symlinks,
hard links, FIFOs, sockets, device nodes, endless and sparse files, deep nesting.

Every read checks the type and size first and reads at most its limit (gemmachat/safe_io.py);
every write replaces only a regular file (the one a symlink points to), keeping its mode, and
writes a stream directly only where that is the point (/dump); /save and /dump replace only what
they wrote before."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

from gemmachat.conversation import Conversation

GREEDY = ("--temp", "0", "-t", "1")


def piped_chat(run_cli, script: str, *args: str, timeout: float = 90):
    """The piped chat, whose scripts here all hold lines that are refused: exit status 1."""
    result = run_cli("--chat", "-n", "2", *GREEDY, *args, input=script, timeout=timeout)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def test_save_and_dump_replace_only_their_own_files(run_cli, tmp_path: Path) -> None:
    # `/save poem.txt` replaced the user's poem with JSON, without a word.
    poem, saved, dump, empty = (tmp_path / name for name in ("poem.txt", "saved.json", "dump.txt", "empty"))
    poem.write_text("Roses are red.\n")
    empty.write_bytes(b"")
    # The first dump is of an empty conversation: "<bos>" alone, which a later dump replaces.
    result = piped_chat(run_cli, "\n".join([f"/dump {dump}", "Hello", f"/save {poem}", f"/dump {poem}", f"/save {saved}",
                                            "Again", f"/save {saved}", f"/dump {dump}", f"/dump {dump}",
                                            f"/save {empty}"]) + "\n")
    out = result.stdout
    assert f"not replacing {poem}: it is not a saved conversation (choose another name" in result.stderr
    assert f"not replacing {poem}: it is not an earlier /dump" in result.stderr
    assert poem.read_text() == "Roses are red.\n"
    assert [m["content"] for m in json.loads(saved.read_text())["messages"]][::2] == ["Hello", "Again"]
    assert out.count(f"to {dump}") == 3 and "<start_of_turn>user\nAgain" in dump.read_text()
    assert json.loads(empty.read_text())["format"] == "gemma-chat conversation"  # nothing in it to lose


def test_save_and_dump_write_through_links_keep_modes_and_never_replace_a_fifo_socket_or_device(
        run_cli, tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text(Conversation(system=None).to_json())  # an earlier save: /save replaces only those
    real.chmod(0o644)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    shared = tmp_path / "shared.json"
    shared.write_text("{}")
    os.link(shared, tmp_path / "shared-too.json")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    unread_fifo = tmp_path / "unread-fifo"
    os.mkfifo(unread_fifo)
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "sock"))
        device = tmp_path / "full"
        try:  # a copy of /dev/full's node: as root, /save /dev/full used to replace the node
            os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        except PermissionError:
            device = Path("/dev/full")
        stdout_link = tmp_path / "stdout"
        stdout_link.symlink_to("/proc/self/fd/1")  # what /dev/stdout is
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
        reader.start()
        result = piped_chat(run_cli, "\n".join([
            "Hello", f"/save {link}", f"/save {shared}", f"/save {fifo}", f"/save {tmp_path / 'sock'}",
            f"/save {device}", f"/dump {fifo}", f"/dump {unread_fifo}", f"/dump {stdout_link}",
            f"/dump {device}"]) + "\n")
        reader.join(30)
    out, refusals = result.stdout, result.stderr
    assert link.is_symlink() and json.loads(real.read_text())["messages"][0]["content"] == "Hello"
    assert stat.S_IMODE(real.stat().st_mode) == 0o644
    assert f"cannot write {shared}: it has 2 hard links" in refusals and shared.read_text() == "{}"
    assert f"cannot write {fifo}: it is a FIFO, not a regular file" in refusals
    assert f"cannot write {tmp_path / 'sock'}: it is a socket, not a regular file" in refusals
    assert f"cannot write {device}: it is a device, not a regular file" in refusals
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and stat.S_ISSOCK((tmp_path / "sock").lstat().st_mode)
    assert stat.S_ISCHR(device.lstat().st_mode) and stdout_link.is_symlink()
    # /dump writes streams directly: the FIFO's reader and stdout get the prompt text.
    assert received and received[0].startswith(b"<bos><start_of_turn>user\n")
    assert f"cannot write {unread_fifo}: nothing is reading it" in refusals
    assert out.count("<start_of_turn>user\n") >= 1 and f"characters to {stdout_link}" in out
    assert f"cannot write {device}: No space left on device" in refusals
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left"


def test_reads_of_endless_sparse_fifo_and_device_files_are_refused_at_once(run_cli, tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.txt"
    with open(sparse, "wb") as file:
        file.truncate(3 << 30)  # 3 GB of nothing on disk
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: opening it to read used to hang
    notes = tmp_path / "notes.txt"
    notes.write_text("The secret word is marmalade.\n")
    dump = tmp_path / "dump.txt"
    # The first line is `cat /dev/zero | gemma-chat` for a while: skipped, never held whole.
    result = piped_chat(run_cli, "\n".join([
        "x" * ((10 << 20) + 1), "/upload /dev/zero", f"/upload {fifo}", f"/upload {sparse}", "/load /dev/zero", f"/load {fifo}",
        f"/load {sparse}", f"/upload {tmp_path}", f"/load {tmp_path}", f"/upload {notes}", f"/dump {dump}"]) + "\n")
    refusals = result.stderr
    # A directory: the file reader's own opening gave a traceback, and the chat ended.
    assert refusals.count(f"cannot read {tmp_path}: it is a directory, not a regular file") == 2, refusals
    assert "skipped a line of input longer than 10240 KiB" in refusals
    assert "cannot read /dev/zero: it is a device, not a regular file" in refusals
    assert f"cannot read {fifo}: it is a FIFO, not a regular file" in refusals
    assert f"{sparse} is {3 << 20} KiB; /upload takes text files up to 1024 KiB" in refusals
    assert f"{sparse} is {3 << 20} KiB; /load takes conversations up to" in refusals
    assert "uploaded notes.txt" in result.stdout and "marmalade" in dump.read_text()
    # --cli -f, the config file and --template: one line and exit 2, before the model loads.
    for args, env, message in [
            (["--cli", "-f", "/dev/zero"], {}, "prompt file /dev/zero is more than 10240 KiB"),
            (["--cli", "-f", str(sparse)], {}, f"prompt file {sparse} is {3 << 20} KiB"),
            (["--cli", "-p", "x"], {"GEMMA_CHAT_CONFIG": "/dev/zero"},
             "cannot read config file /dev/zero: it is a device"),
            (["--cli", "-p", "x", "--template", str(fifo)], {}, f"cannot read template {fifo}: it is a FIFO"),
            (["--cli", "-f", str(tmp_path)], {}, f"cannot read prompt file {tmp_path}: it is a directory"),
            (["--cli", "-p", "x"], {"GEMMA_CHAT_CONFIG": str(tmp_path)}, f"cannot read config file {tmp_path}: it is a"),
            (["--cli", "-p", "x", "--template", str(tmp_path)], {}, f"cannot read template {tmp_path}: it is a"),
            (["--cli", "-p", "x", "--grammar-file", str(tmp_path)], {}, f"cannot read --grammar-file {tmp_path}: it"),
            (["--cli", "-p", "x", "--json-schema", f"@{tmp_path}"], {}, f"cannot read --json-schema {tmp_path}: it")]:
        started = time.monotonic()
        cli = run_cli(*args, env=env, timeout=30)
        assert cli.returncode == 2 and cli.stderr.startswith(f"gemma-chat: {message}"), (args, cli.stderr)
        assert cli.stderr.count("\n") == 1 and time.monotonic() - started < 10
    # Reading a stream is the point of -f <(command) and of stdin: read, within the same limit.
    assert run_cli("--cli", "-f", "/dev/stdin", "-n", "1", *GREEDY, input="Hello").returncode == 0
    endless = run_cli("--cli", "-n", "1", input=b"x" * ((10 << 20) + 1))
    assert endless.returncode == 2 and "stdin is more than 10240 KiB" in endless.stderr.decode()


def test_deep_nesting_is_one_line_and_keeps_the_conversation_and_the_config(run_cli, tmp_path: Path) -> None:
    deep_json = tmp_path / "deep.json"
    deep_json.write_text('{"x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    deep_toml = "x = " + "[" * 50_000 + "]" * 50_000 + "\n"
    dump = tmp_path / "dump.txt"
    result = piped_chat(run_cli, f"Hello\n/load {deep_json}\n/dump {dump}\n")
    assert f"cannot load {deep_json}: not a gemma-chat conversation (nested too deeply)" in result.stderr
    assert "<start_of_turn>user\nHello<end_of_turn>" in dump.read_text(), "the conversation is kept"
    template = tmp_path / "deep.toml"
    template.write_text(deep_toml)
    cli = run_cli("--cli", "-p", "x", "--template", str(template))
    assert cli.returncode == 2 and cli.stderr == f"gemma-chat: template {template} is malformed: nested too deeply\n"
    config = tmp_path / "config.toml"
    config.write_text(deep_toml)
    cli = run_cli("--cli", "-p", "Hi", "-n", "1", *GREEDY, env={"GEMMA_CHAT_CONFIG": str(config)})
    assert cli.returncode == 2 and cli.stderr == (f"gemma-chat: config file {config} is not valid TOML (nested too "
                                                  "deeply): correct it, or move it away\n")
    assert config.read_text() == deep_toml

"""The chat in a real terminal (pexpect drives a pseudo-terminal), with the real model.

PROMPT_TOOLKIT_NO_CPR=1 keeps prompt_toolkit from asking the terminal for its cursor position,
which pexpect would have to answer.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import openai
import pexpect

from gemmachat.chat import ServerBehind
from gemmachat.listen import ServerUnavailable
from gemmachat.output import Printer
from gemmachat.recorder import Recorder
from gemmachat.repl import Chat
from gemmachat.server import BackgroundServer
from test_server import REPO, raw_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import run  # noqa: E402  (its peak_rss_of: the bench's own memory measure)

BRACKETED_PASTE = ("\x1b[200~", "\x1b[201~")


class Terminal(pexpect.spawn):
    def send_line(self, text: str) -> None:
        # A terminal's Enter is a carriage return; pexpect's sendline sends ctrl-j, which the
        # chat (as llamafile's) takes as a line break inside the message.
        time.sleep(0.3)  # let the prompt take the terminal into raw mode before typing
        self.send(text + "\r")


def open_chat(cli_env: dict[str, str], *args: str, env: dict[str, str] | None = None) -> Terminal:
    return Terminal(sys.executable, ["-m", "gemmachat", *args],
                    env={**cli_env, "PROMPT_TOOLKIT_NO_CPR": "1", **(env or {})}, encoding="utf-8",
                    timeout=60, dimensions=(40, 120))


def leave(child: Terminal) -> None:
    child.send_line("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def interrupt_a_long_reply(child: Terminal) -> None:
    """A long reply (the chat started with -n 400), stopped with ctrl-c once it streams: the chat
    says so and takes the next line."""
    child.send_line("Write a very long story about the sea.")
    child.expect("sea.")
    # 400 tokens take about 8 s here: this lands mid-reply. Read on meanwhile, as a terminal does:
    # once (CI, beside the other worker; not reproduced since) a ctrl-c sent to a pty holding
    # seconds of unread output left the chat silent, its last render cut where the flush cut it.
    child.expect(pexpect.TIMEOUT, timeout=3)
    child.sendintr()
    child.expect("interrupted", timeout=10)
    child.expect(">>>")


def turns(dump: Path) -> list[str]:
    text = dump.read_text(encoding="utf-8")
    return [part.split("<end_of_turn>")[0].strip() for part in text.split("<start_of_turn>")[1:]]


def test_real_terminal_session(cli_env: dict[str, str], tmp_path: Path) -> None:
    saved = tmp_path / "term.json"
    child = open_chat(cli_env, "--chat", "-n", "400", "-c", "2048")
    child.expect("gemma-chat ")
    child.expect("context: 2048 tokens")
    child.expect(">>>")
    child.send_line("/help")
    child.expect("/upload FILE")
    child.expect(">>>")
    interrupt_a_long_reply(child)
    child.send_line("/set n_predict 6")
    child.expect(">>>")
    child.send_line("And then?")
    child.expect("And then?")
    child.expect(">>>", timeout=30)
    child.send_line("/undo")
    child.expect("dropped 2 message")
    child.send_line(f"/save {saved}")
    child.expect("saved 2 messages")
    leave(child)
    document = json.loads(saved.read_text())
    assert document["messages"][1]["interrupted"] is True
    # A new process loads it back.
    child = open_chat(cli_env, "--chat", "--nologo")
    child.expect(">>>")
    child.send_line(f"/load {saved}")
    child.expect("loaded 2 messages")
    child.expect(">>>")
    time.sleep(0.3)
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_reply_taller_than_the_terminal_is_in_the_scrollback_once(cli_env: dict[str, str], tmp_path: Path) -> None:
    """tmux keeps what scrolls off its screen, as a terminal does: rich's Live, taller than the
    screen, left a copy of its top there at every refresh (over a hundred in an 8-line pane)."""
    dump = tmp_path / "dump.txt"
    tmux = ["tmux", "-L", f"gemma-chat-test-{os.getpid()}"]  # a server of its own: no other session sees it
    command = " ".join([sys.executable, "-m", "gemmachat", "--chat", "-n", "150", "--nologo"])
    env = {**cli_env, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm-256color"}
    subprocess.run([*tmux, "new-session", "-d", "-x", "60", "-y", "8", command], env=env, check=True, cwd=REPO)
    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-S", "-", "-E", "-"], capture_output=True,
                              text=True, check=True).stdout

    try:
        deadline = time.monotonic() + 60
        while ">>>" not in pane():  # keys typed before the prompt takes the terminal are echoed by it
            assert time.monotonic() < deadline, "the chat did not start"
            time.sleep(0.2)
        message = "Write a long paragraph about the history of the sea."
        # The dump is typed while the reply streams: the chat takes it at its next prompt.
        subprocess.run([*tmux, "send-keys", message, "Enter", f"/dump {dump}", "Enter"], check=True)
        deadline = time.monotonic() + 90
        while not dump.exists():
            assert time.monotonic() < deadline, "the chat wrote no dump"
            time.sleep(0.5)
        screen = pane()
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    reply = dump.read_text(encoding="utf-8").split("<start_of_turn>model\n")[1].split("<end_of_turn>")[0]
    assert len(reply.split()) > 40, reply  # well over the 8 lines of the pane, wrapped at 60 columns
    # A word of the reply's own (the prompt's line can be drawn twice), ASCII (never cut by a wrap).
    probe = next(word for word in reply.split() if word.isascii() and word.isalpha() and word not in message)
    assert screen.split().count(probe) == reply.split().count(probe), screen


def test_multi_line_input_paste_completion_and_manual_mode(cli_env: dict[str, str], tmp_path: Path) -> None:
    data_home = tmp_path / "data"
    (data_home / "gemma-chat").mkdir(parents=True)
    # A damaged input history: set aside with a warning, and the chat starts anyway.
    (data_home / "gemma-chat" / "history").write_bytes(b"\n# 2026\n+\xff\xfe broken\n")
    dump = tmp_path / "dump.txt"
    child = open_chat(cli_env, "--chat", "-n", "3", "--nologo", env={"XDG_DATA_HOME": str(data_home)})
    child.expect("input history was damaged")
    child.expect(">>>")
    assert (data_home / "gemma-chat" / "history.corrupt").read_bytes().endswith(b"\xff\xfe broken\n")

    # Tab completes a command name ("/he" alone would be an unknown command, not the help).
    time.sleep(0.3)
    child.send("/he\t")
    child.expect("lp")
    child.send("\r")
    child.expect("/upload FILE")
    child.expect(">>>")
    # /context before any message, to compare with after.
    child.send_line("/context")
    child.expect(r"context: (\d+) tokens used")
    used_before = int(child.match.group(1))
    child.expect(">>>")

    # ctrl-j breaks the line inside one message.
    time.sleep(0.3)
    child.send("first line")
    child.sendcontrol("j")
    child.send("second line\r")
    child.expect("second line")
    child.expect(">>>", timeout=30)
    # A \"\"\" block: everything up to the closing quotes is one message.
    child.send_line('"""')
    child.expect(r"\.\.\.")
    child.send_line("alpha")
    child.expect(r"\.\.\.")
    child.send_line('beta"""')
    child.expect('beta"""')
    child.expect(">>>", timeout=30)
    # A bracketed paste of several lines is one message, sent only with Enter.
    time.sleep(0.3)
    child.send(BRACKETED_PASTE[0] + "pasted one\npasted two\r\npasted three" + BRACKETED_PASTE[1])
    child.expect("pasted three")
    time.sleep(0.5)
    child.send("\r")
    # Typed ahead while the reply streams: Enter must still send it, not break the line.
    child.send("/context\r")
    child.expect(r"context: (\d+) tokens used", timeout=30)
    assert int(child.match.group(1)) > used_before + 20
    child.expect(">>>")

    # Manual mode: an empty line cycles the role; only a user message gets a reply.
    child.send_line("/manual on")
    child.expect("manual mode on")
    child.expect("user >>>")
    child.send_line("")
    child.expect("now typing as assistant")
    child.expect("assistant >>>")
    child.send_line("I was typed as the assistant.")
    child.expect("assistant >>>")
    child.send_line("/manual off")
    child.expect("manual mode off")
    child.expect(">>>")
    child.send_line(f"/dump {dump}")
    child.expect("wrote")
    leave(child)

    conversation = turns(dump)
    users = [turn for turn in conversation if turn.startswith("user\n")]
    assert users[0].endswith("first line\nsecond line")
    assert users[1] == "user\nalpha\nbeta"
    assert users[2] == "user\npasted one\npasted two\npasted three"
    assert conversation[-1] == "model\nI was typed as the assistant."
    assert len(conversation) == 7, conversation  # three exchanges and the manual assistant turn
    # The history kept what was typed, in a fresh file.
    history = (data_home / "gemma-chat" / "history").read_text(encoding="utf-8")
    assert "+first line\n+second line" in history and "+/manual on" in history


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_background_server_answers_while_the_chat_runs(cli_env: dict[str, str]) -> None:
    port = free_port()
    child = open_chat(cli_env, "-n", "4", "--port", str(port))
    child.expect(f"server: http://127.0.0.1:{port}")
    child.expect(">>>")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    answer = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Say hello."}], max_tokens=5, temperature=0)
    assert answer.choices[0].message.content and answer.usage.completion_tokens <= 5
    # The chat in the foreground still answers, and the server still answers after it.
    child.send_line("Hello from the terminal.")
    child.expect(">>>", timeout=30)
    child.send_line("/context")
    child.expect(r"context: (\d+) tokens used")
    assert int(child.match.group(1)) > 0
    streamed = client.completions.create(model="any", prompt="The sky is", max_tokens=4, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed)
    # Its chat page lists the chat's conversation: they share the store.
    status, listing = raw_request(port, "GET", "/conversations")
    assert status == 200 and json.loads(listing)["data"][0]["title"] == "Hello from the terminal."
    status, page = raw_request(port, "GET", "/")
    assert status == 200 and b"/web/app.js" in page
    leave(child)


def gguf_mappings(pid: int, gguf: Path) -> list[tuple[int, int]]:
    """(file offset, size) of each mapping of `gguf` in process `pid`."""
    mappings = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]) == gguf.resolve():
            start, end = (int(address, 16) for address in fields[0].split("-"))
            mappings.append((int(fields[2], 16), end - start))
    return mappings


def test_the_chat_and_its_background_server_load_the_weights_once(cli_env: dict[str, str],
                                                                   model_path: Path) -> None:
    def one_reply_each(port: int | None) -> tuple[list[tuple[int, int]], int]:
        """The GGUF's mappings and the peak RSS after a chat reply and, with a server on `port`,
        an API reply."""
        child = open_chat(cli_env, "-n", "8", *(["--port", str(port)] if port else ["--chat"]))
        child.expect(">>>")
        child.send_line("Hello from the terminal.")
        child.expect(">>>", timeout=30)
        if port:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                   timeout=60)
            client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi."}],
                                           max_tokens=8, temperature=0)
        measured = gguf_mappings(child.pid, model_path), run.peak_rss_of(child.pid)
        leave(child)
        return measured

    alone_mappings, alone_peak = one_reply_each(None)
    both_mappings, both_peak = one_reply_each(free_port())
    gguf_size = model_path.stat().st_size
    # The weights are read from one shared mapping of the GGUF, not copied for the server...
    assert len(both_mappings) == 1 and both_mappings == alone_mappings
    assert both_mappings[0][1] > 0.9 * gguf_size
    # ...so the server costs far less than a second copy would (its own KV slots and HTTP stack:
    # about 60 MiB with 4 slots here, measured by bench/run.py).
    assert both_peak - alone_peak < gguf_size / 2, (both_peak, alone_peak)


@contextmanager
def taken_ports(count: int, free_after: int = 0) -> Iterator[int]:
    """Listens on `count` consecutive ports of 127.0.0.1 (the next `free_after` free when checked),
    and yields the first."""
    for _ in range(100):
        first = free_port()
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count + free_after):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
                sock.listen()
        except OSError:
            for sock in held:
                sock.close()
            continue
        for sock in held[count:]:
            sock.close()
        try:
            yield first
        finally:
            for sock in held[:count]:
                sock.close()
        return
    raise AssertionError("no run of free ports found")


def test_a_taken_port_moves_the_background_server_to_the_next(cli_env: dict[str, str]) -> None:
    with taken_ports(1, free_after=1) as port:
        child = open_chat(cli_env, "-n", "3", "--port", str(port))
        child.expect(rf"server: http://127.0.0.1:{port + 1}/ \(port {port} is in use; the chat page, and an OpenAI")
        child.expect(">>>")
        with urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/health", timeout=30) as health:
            assert health.status == 200 and json.load(health)["status"] == "ok"
        leave(child)


def test_every_port_taken_leaves_the_chat_running_without_server(cli_env: dict[str, str]) -> None:
    with taken_ports(10) as port:
        child = open_chat(cli_env, "-n", "3", "--port", str(port))
        child.expect(rf"server: off \(ports {port} to {port + 9} are in use; choose another with --port\)")
        child.expect(">>>")
        child.send_line("Still here?")
        child.expect(">>>", timeout=30)
        leave(child)


def test_a_server_that_fails_to_start_behind_the_prompt_is_said_once_at_the_next_turn(tmp_path: Path) -> None:
    # Its port was bound before the banner named it; only its start can still fail, on a thread.
    def fail() -> BackgroundServer:
        raise ServerUnavailable("the server did not start: boom")

    out = io.StringIO()
    server = ServerBehind(fail)
    keeping_nothing = Recorder(None, None, tmp_path, print, "off")  # type: ignore[arg-type]
    chat = Chat(session=None, printer=Printer(plain=True, stream=out),  # type: ignore[arg-type]
                template_description="", recorder=keeping_nothing, notices=server.take_failure)
    server.stop()  # returns once the start has ended, here in failure
    chat.handle("/bogus")
    chat.handle("/bogus")
    lines = out.getvalue().splitlines()
    assert lines[0] == "server: off (the server did not start: boom)"
    assert len(lines) == 3 and "bogus" in lines[1] and "bogus" in lines[2]


def test_the_first_start_copies_the_model_with_a_bar_that_reaches_the_end(cli_env: dict[str, str],
                                                                         model_path: Path, tmp_path: Path) -> None:
    # A fresh cache: the chat copies the model into it once, with a progress bar, and only then
    # loads it under its spinner (whose live display used to freeze the bar at 0.0/253.1 MB).
    # 80 columns, with pytest's long folder as the cache: a bar that named it left no room for its
    # figures.
    child = Terminal(sys.executable, ["-m", "gemmachat", "--chat"], encoding="utf-8", timeout=120,
                     env={**cli_env, "PROMPT_TOOLKIT_NO_CPR": "1", "GEMMA_CHAT_CACHE_DIR": str(tmp_path / "cache")},
                     dimensions=(40, 80))
    assert len(f"copying the model once into {tmp_path / 'cache'}") > 60
    child.expect(">>>")
    output = child.before
    total = f"{model_path.stat().st_size / 1e6:.1f}"
    copying, complete = output.find("copying the model once"), output.rfind(f"{total}/{total} MB")
    assert 0 <= copying < complete < output.find("loading model"), output[-2000:]
    leave(child)

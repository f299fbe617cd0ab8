"""Faults around the program: a full disk, a damaged input history, signals in every mode, and
stdout closed early. Each runs the real program in a process (or a real terminal)."""

from __future__ import annotations

import json
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pexpect
import pytest

from gemmachat.repl import AtomicFileHistory
from test_server import ServerProcess, raw_request

REPO = Path(__file__).resolve().parent.parent
GEMMA_CHAT = [sys.executable, "-m", "gemmachat"]
LONG = ["-p", "1, 2, 3,", "-n", "3000", "--ignore-eos", "--temp", "0", "-t", "1"]
OLD = b'{"format": "gemma-chat conversation", "version": 1, "system": null, "messages": []}'  # an earlier save


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[tuple[Path, dict]]:
    """A folder on a nearly full filesystem: (folder, extra subprocess arguments).

    A 256 KiB tmpfs filled to its last 8 KiB where mounting is allowed (root, as here and in
    CI); elsewhere a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so a write fails with
    EFBIG instead of killing the process), which the program meets the same way: a failed write.
    """
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        if mounted:
            (folder / "saved.json").write_bytes(OLD)
            with open(folder / "filler", "wb") as filler:
                filler.write(b"\0" * (248 * 1024))
            yield folder, {}
        else:
            (folder / "saved.json").write_bytes(OLD)

            def limit() -> None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))

            yield folder, {"preexec_fn": limit}
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_a_clear_error_and_the_old_file_stays(full_disk, cli_env: dict[str, str],
                                                              tmp_path: Path) -> None:
    folder, extra = full_disk
    system = tmp_path / "system.txt"
    system.write_text("You answer briefly. " * 1000)  # 20 KB: more than the disk has left
    target = folder / "saved.json"
    result = subprocess.run([*GEMMA_CHAT, "--chat", "-f", str(system), "-c", "8192", "-t", "1"],
                            input=f"/save {target}\n", env=cli_env, cwd=REPO,
                            capture_output=True, text=True, timeout=120, **extra)
    assert result.returncode == 1, result.stderr  # the /save that failed
    errors = [line for line in result.stderr.splitlines() if "cannot write" in line]
    assert len(errors) == 1 and f"cannot write {target}" in errors[0], result.stderr
    assert "No space left on device" in errors[0] or "File too large" in errors[0]
    assert target.read_bytes() == OLD
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        ["saved.json"] + (["filler"] if not extra else []))  # no temporary file left behind


def test_history_on_a_full_disk_keeps_the_old_file_and_reports_once(full_disk) -> None:
    folder, extra = full_disk
    if extra:
        pytest.skip("needs the tmpfs: a file-size limit would apply to the whole test process")
    path = folder / "history"
    history = AtomicFileHistory(str(path))
    history.store_string("fits")
    before = path.read_bytes()
    history.store_string("x" * 20_000)
    assert path.read_bytes() == before
    assert "No space left on device" in (history.take_problem() or "")
    history.store_string("y" * 20_000)
    assert history.take_problem() is None  # said once, not after every line
    assert sorted(p.name for p in folder.iterdir()) == ["filler", "history", "saved.json"]


def test_a_damaged_history_is_set_aside_and_sigterm_at_the_prompt_exits_cleanly(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "gemma-chat").mkdir(parents=True)
    damaged = b"\n# 2024\n+caf\xe9\n+\xff\xfe\n"
    (data / "gemma-chat" / "history").write_bytes(damaged)
    env = {**cli_env, "XDG_DATA_HOME": str(data), "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "gemmachat", "--chat", "--nologo", "-n", "4", "-t", "1"],
                          env=env, cwd=str(REPO), encoding="utf-8", timeout=60, dimensions=(40, 120))
    child.expect("input history was damaged; moved it to")
    child.expect(">>>")
    time.sleep(0.3)
    child.send("Hello\r")
    child.expect(">>>", timeout=60)
    time.sleep(0.3)
    child.kill(signal.SIGTERM)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus in (0, 130), (child.exitstatus, child.signalstatus)
    assert "Traceback" not in (child.before or "")
    folder = data / "gemma-chat"
    assert (folder / "history.corrupt").read_bytes() == damaged
    assert (folder / "history").read_text().endswith("+Hello\n")
    # Nothing half-written left behind: the input history, the conversation kept (with its KV
    # cache, saved on the way out) and nothing else.
    assert sorted(p.name for p in folder.iterdir()) == ["conversations.db", "history", "history.corrupt", "kv"]
    assert [p.name for p in (folder / "kv").iterdir()] == ["1.state"]


def _started(process: subprocess.Popen) -> None:
    """Waits until the process has written its first output (so a signal lands mid-generation)."""
    assert process.stdout is not None
    first = process.stdout.read(1)
    assert first, process.stderr.read() if process.stderr else ""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_generation_ends_the_cli_cleanly(cli_env: dict[str, str], signum: int) -> None:
    # A shell without job control starts background commands with SIGINT ignored, and children
    # inherit that (so does Python, which then installs no KeyboardInterrupt): run as from a terminal.
    process = subprocess.Popen([*GEMMA_CHAT, "--cli", *LONG], env=cli_env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _started(process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, (process.returncode, stderr)
    assert stderr.strip() == b"", stderr


def test_sigterm_mid_reply_ends_the_piped_chat_cleanly(cli_env: dict[str, str]) -> None:
    process = subprocess.Popen([*GEMMA_CHAT, "--chat", "-n", "3000", "--ignore-eos", "-t", "1"], env=cli_env,
                               cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(b"Count to a thousand.\n")
    process.stdin.flush()
    _started(process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, (process.returncode, stderr)
    assert b"Traceback" not in stderr and b"Exception" not in stderr, stderr


def test_sigint_mid_stream_stops_the_server_with_status_0(cli_env: dict[str, str]) -> None:
    server = ServerProcess(cli_env, "-t", "1")
    unstreamed: list[int] = []
    try:
        waiting = threading.Thread(target=lambda: unstreamed.append(raw_request(
            server.port, "POST", "/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 2000}, timeout=60)[0]))
        waiting.start()
        stream = subprocess.Popen(["curl", "-sN", server.url + "/v1/completions", "-d",
                                   json.dumps({"prompt": "1, 2, 3,", "max_tokens": 2000, "stream": True})],
                                  stdout=subprocess.PIPE)
        _started(stream)
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(15) == 0
        stream.wait(15)
        received = stream.stdout.read()  # after _started's read(1): through the same buffer
        waiting.join(15)
    finally:
        server.stop()
    assert unstreamed == [503], unstreamed  # it was a 200 holding the reply as far as it got
    assert not [line for line in server.lines if "Traceback" in line], server.lines
    # The stream ends in an error, not in finish_reason "stop": a client would take a cut reply as whole.
    events = [line[len(b"data: "):] for line in received.splitlines() if line.startswith(b"data: ")]
    assert events and json.loads(events[-1])["error"]["code"] == "shutting_down", received[-600:]


def test_sigterm_while_requests_tokenize_detokenize_and_render_exits_0_in_time(cli_env: dict[str, str]) -> None:
    # Shutdown used to wait only for generations: a request still tokenizing had the model freed
    # under it (a segfault in libllama.so 27 s later, or SIGABRT and a plain-text 500).
    server = ServerProcess(cli_env, "-t", "1", "-n", "1")
    requests = [("/tokenize", {"content": "s\n\n" * 40000}),  # took 6 to 28 s before it was refused early
                ("/tokenize", {"content": "s\n\n" * 650}), ("/detokenize", {"tokens": list(range(100, 2000))}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi\n\n" * 300}]}),
                ("/v1/completions", {"prompt": "word " * 1000, "echo": True})]
    statuses: list[int | str] = []
    errors: list[tuple[str, bytes]] = []  # what a 5xx said, for the assertion's message
    stop = threading.Event()

    def keep_asking(path: str, body: dict) -> None:
        while not stop.is_set():
            try:
                status, answer = raw_request(server.port, "POST", path, body, timeout=30)
            except OSError as error:  # refused or cut off once the server stops listening
                statuses.append(type(error).__name__)
                return
            statuses.append(status)
            if status >= 500 and status != 503:
                errors.append((path, answer[:300]))

    clients = [threading.Thread(target=keep_asking, args=request, daemon=True) for request in requests * 2]
    try:
        for client in clients:
            client.start()
        time.sleep(1.5)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0, server.lines[-5:]
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        server.stop()
    for client in clients:
        client.join(30)
    assert not errors, (errors, server.lines[-8:])
    assert statuses.count(200) >= 5, statuses
    assert not [line for line in server.lines if "Traceback" in line or "failed" in line], server.lines


def test_stdout_closed_early_exits_quietly(cli_env: dict[str, str]) -> None:
    # `gemma-chat --cli ... | head -c 10`, with the exit status and stderr checked exactly.
    process = subprocess.Popen([*GEMMA_CHAT, "--cli", *LONG], env=cli_env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    assert len(process.stdout.read(10)) == 10
    process.stdout.close()
    assert process.wait(60) == 0
    assert process.stderr.read() == b""


def test_output_that_cannot_be_written_is_one_line_and_the_conversation_is_kept(cli_env: dict[str, str],
                                                                                tmp_path: Path) -> None:
    # `> /dev/full` (a full disk under a redirection) was a traceback in every mode, two chained in
    # the chat; stdout closed with `>&-` was an AttributeError.
    env = {**cli_env, "GEMMA_CHAT_DATA_DIR": str(tmp_path)}
    full = "gemma-chat: cannot write the output: No space left on device\n"
    for args, stdin in [(["--cli", "-p", "Once upon a time", "-n", "8"], None),
                        (["--chat", "-n", "8"], "Hello there\n"),
                        (["--list-models"], None), (["--cache-info"], None),
                        # argparse swallows its own failed write: these left with 0, saying nothing.
                        (["--help"], None), (["--version"], None)]:
        with open("/dev/full", "w") as device:
            result = subprocess.run([*GEMMA_CHAT, *args], input=stdin, stdout=device, stderr=subprocess.PIPE,
                                    text=True, env=env, cwd=REPO, timeout=120)
        assert (result.returncode, result.stderr) == (1, full), args
    with sqlite3.connect(tmp_path / "conversations.db") as db:
        assert db.execute("SELECT role, content FROM messages ORDER BY position").fetchall()[0] == ("user", "Hello there")
    closed = subprocess.run(f"{' '.join(GEMMA_CHAT)} --cli -p Hi -n 2 >&-", shell=True, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO, timeout=120)
    assert (closed.returncode, closed.stderr) == (2, "gemma-chat: standard output is closed: there is nowhere "
                                                     "to write the output (>/dev/null discards it)\n")

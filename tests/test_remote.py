"""--remote for real: the chat and --cli against real servers on 127.0.0.1, gemma-chat's own
--server and llama.cpp's llama-server (built from the vendored source, bench/native.py), both on
the default model's GGUF; no model is loaded on the chat's side."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pexpect
import pytest
from test_chat_terminal import leave, open_chat
from test_server import REPO, ServerProcess, free_port

KEY = "remote-test-key"
PROMPT = ["-p", "The capital of France is", "-n", "24", "--temp", "0"]


@pytest.fixture(scope="module")
def server(server_env: dict[str, str], model_path: Path) -> Iterator[ServerProcess]:
    running = ServerProcess(server_env, "-m", str(model_path), "--api-key", KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def llama_server(native_tools: Path, model_path: Path) -> Iterator[str]:
    """llama.cpp's own server on the same GGUF, ready once its /health answers 200."""
    port = free_port()
    process = subprocess.Popen([str(native_tools / "llama-server"), "-m", str(model_path), "--host", "127.0.0.1",
                                "--port", str(port), "-c", "2048", "-t", "2", "-np", "1"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as health:
                if health.status == 200:
                    break
        except (OSError, urllib.error.URLError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"llama-server did not start: {process.communicate()[1].decode()[-2000:]}")
        time.sleep(0.2)
    yield url
    process.kill()
    process.wait(10)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-chat: "), result.stderr
    return lines[0]


def test_remote_cli_prints_what_the_local_cli_prints(run_cli, model_path: Path, server: ServerProcess,
                                                     llama_server: str) -> None:
    local = run_cli("--cli", "-m", str(model_path), *PROMPT)
    assert local.returncode == 0 and len(local.stdout) > 40, local.stderr
    ours = run_cli("--remote", server.url, "--api-key", KEY, "--cli", *PROMPT)
    assert (ours.returncode, ours.stdout) == (0, local.stdout), ours.stderr
    # The URL an OpenAI client takes (with /v1) works too, and the key from the environment.
    native = run_cli("--cli", *PROMPT, env={"GEMMA_CHAT_REMOTE": llama_server + "/v1/"})
    assert (native.returncode, native.stdout) == (0, local.stdout), native.stderr


def test_remote_cli_chat_turn_and_stored_turns_use_the_servers_template(run_cli, server: ServerProcess,
                                                                      cli_env: dict[str, str]) -> None:
    remote = ["--remote", server.url, "--api-key", KEY, "--cli", "-n", "8", "--temp", "0"]
    answer = run_cli(*remote, "--chat-turn", "-p", "Say hello.")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    for question in ("Hello there.", "And then?"):
        turn = run_cli(*remote, "--save-to", "notes", "-p", question)
        assert turn.returncode == 0, turn.stderr
    with sqlite3.connect(Path(cli_env["HOME"]) / ".local/share/gemma-chat/conversations.db") as db:
        rows = db.execute("SELECT role, content FROM messages ORDER BY position").fetchall()
    assert [role for role, _ in rows] == ["user", "assistant", "user", "assistant"]
    assert rows[2][1] == "And then?" and rows[3][1].strip()


def test_chat_commands_over_remote_in_a_real_terminal(cli_env: dict[str, str], server: ServerProcess,
                                                      tmp_path: Path) -> None:
    saved = tmp_path / "remote.json"
    child = open_chat(cli_env, "--remote", server.url, "--api-key", KEY, "-n", "400")
    child.expect(r"\(remote: no model loaded here\)")
    child.expect("type /help")
    child.expect(">>>")
    # A long reply, stopped with ctrl-c once it streams: the stream is closed, the text kept.
    child.send_line("Write a very long story about the sea.")
    child.expect("sea.")
    time.sleep(3)  # as in test_chat_terminal: the reply is streaming by then
    child.sendintr()
    child.expect("interrupted", timeout=10)
    child.expect(">>>")
    child.send_line("/set n_predict 6")
    child.expect(">>>")
    child.send_line("And then?")
    child.expect(">>>", timeout=30)
    child.send_line("/stats")
    child.expect(r"last reply: prompt \d+ tokens evaluated \(cache reuse unknown\)")
    child.expect(r"(\d+) tokens generated")
    assert 1 <= int(child.match.group(1)) <= 6
    child.send_line("/context")
    child.expect(r"context: (\d+) tokens used, unknown total")
    assert int(child.match.group(1)) > 10
    child.send_line("/dump")
    child.expect("the server applies its own chat template")
    child.expect('"content": "And then\\?"')
    child.send_line(f"/save {saved}")
    child.expect("saved 4 messages")
    child.send_line("/history")
    child.expect(r"\*\s+1 .* 2\s+gemma-3-270m")
    leave(child)
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["interrupted"] is True and messages[1]["content"].strip()


def test_errors_are_one_line(run_cli, server: ServerProcess) -> None:
    prompt = ["--cli", "-p", "Hi", "-n", "2"]
    closed = f"http://127.0.0.1:{free_port()}"
    assert "cannot connect to " + closed + ": Connection refused" in one_line_error(run_cli("--remote", closed, *prompt))
    assert "wants an API key: give it with --api-key" in one_line_error(run_cli("--remote", server.url, *prompt))
    assert "refused the API key (401" in one_line_error(run_cli("--remote", server.url, "--api-key", "wrong", *prompt))
    unknown = one_line_error(run_cli("--remote", server.url, "--api-key", KEY, "-m", "gemma-99b", *prompt))
    assert "has no model 'gemma-99b'; it has 'gemma-3-270m" in unknown
    # The chat starts with the same check, and the same line.
    assert "cannot connect to" in one_line_error(run_cli("--remote", closed, "--chat", input="Hi\n"))
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert "did not answer within 1 s (--timeout)" in one_line_error(
            run_cli("--remote", url, "--timeout", "1", *prompt))
    assert "--remote expects an http:// or https:// URL" in one_line_error(run_cli("--remote", "127.0.0.1:8080", *prompt))


def test_a_server_killed_mid_reply_leaves_the_partial_reply_and_one_line(server_env: dict[str, str],
                                                                       model_path: Path, cli_env: dict[str, str]) -> None:
    doomed = ServerProcess(server_env, "-m", str(model_path))
    try:
        client = subprocess.Popen(
            [sys.executable, "-m", "gemmachat", "--remote", doomed.url, "--cli", "--save-to", "doomed",
             "-n", "400", "-p", "Write a very long story about the sea."],
            env=cli_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        assert client.stdout is not None
        streamed = b""
        while len(streamed) < 20:  # the reply is streaming (unbuffered reads: communicate() reads on)
            streamed += client.stdout.read(20) or pytest.fail("no reply came")
        doomed.process.kill()
        out, error = client.communicate(timeout=60)
    finally:
        doomed.stop()
    printed, err = (streamed + out).decode(), error.decode()
    assert client.returncode == 2 and len(printed) >= 20, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "closed the connection mid-reply" in lines[0], err
    with sqlite3.connect(Path(cli_env["HOME"]) / ".local/share/gemma-chat/conversations.db") as db:
        reply = db.execute("SELECT content, interrupted FROM messages WHERE role = 'assistant'").fetchall()
    assert reply == [(printed, 1)]


def test_help_names_remote() -> None:
    result = subprocess.run([sys.executable, "-m", "gemmachat", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "--remote URL" in result.stdout and "GEMMA_CHAT_REMOTE" in result.stdout


def test_config_file_names_the_remote(run_cli, cli_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    closed = f"http://127.0.0.1:{free_port()}"
    config.write_text(f'remote = "{closed}"\n')
    line = one_line_error(run_cli("--cli", "-p", "Hi", env={"GEMMA_CHAT_CONFIG": str(config)}))
    assert f"cannot connect to {closed}" in line

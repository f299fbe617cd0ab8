"""ctrl-c at any moment of start-up leaves at once with status 130 (gemmachat/fatal.py): no
traceback, no chat started after all, and nothing left half-written. The real program, in a real
terminal (pexpect) and piped, interrupted while it imports, copies the model, loads it (inside
llama.cpp, found by its --verbose log: there Python's own handler cannot run), and after.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from test_faults import GEMMA_CHAT, REPO
from test_server import free_port

SHOW_CURSOR, HIDE_CURSOR = "\x1b[?25h", "\x1b[?25l"
# llama.cpp's log lines while it reads the weights, and while it makes the context.
IN_LLAMA_CPP = {"model load": "load_tensors:", "context": "llama_context:"}


def spawn_chat(env: dict[str, str], *args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "gemmachat", "-n", "3", "--port", str(free_port()), *args],
                         env={**env, "PROMPT_TOOLKIT_NO_CPR": "1"}, encoding="utf-8", timeout=60,
                         dimensions=(40, 120), cwd=str(REPO))


def interrupt(child: pexpect.spawn) -> str:
    """ctrl-c, then everything the chat wrote; it must have ended at once with status 130."""
    sent = time.monotonic()
    child.sendintr()
    child.expect(pexpect.EOF, timeout=10)
    child.close()
    assert time.monotonic() - sent < 3
    output = child.before or ""
    assert (child.exitstatus, child.signalstatus) == (130, None), output[-500:]
    assert "Traceback" not in output and "Exception ignored" not in output, output[-1000:]
    assert ">>>" not in output
    # A spinner that hid the cursor does not leave it hidden.
    assert output.rfind(SHOW_CURSOR) >= output.rfind(HIDE_CURSOR)
    return output


def assert_nothing_half_written(home: Path) -> None:
    for path in home.rglob("*"):
        assert not path.name.endswith((".tmp", ".partial")), path
        assert not (path.name == "history" and path.stat().st_size), path


@pytest.fixture
def chat_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**cli_env, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_STATE_HOME": str(tmp_path / "state")}


# While it imports, and while it loads the model: the chat's prompt comes about 0.8 s after launch,
# and the server's start ends about then, on 2 idle cores.
EARLY = pytest.mark.parametrize("seconds", [0.3, 0.6], ids=["0.3 s in", "0.6 s in"])


@EARLY
def test_ctrl_c_early_in_the_chats_start_up(chat_env: dict[str, str], model_path: Path, tmp_path: Path,
                                            seconds: float) -> None:
    child = spawn_chat(chat_env)
    time.sleep(seconds)
    interrupt(child)
    assert_nothing_half_written(tmp_path)


@pytest.mark.parametrize("stage", list(IN_LLAMA_CPP), ids=list(IN_LLAMA_CPP))
def test_ctrl_c_inside_llama_cpp_while_the_chat_loads(chat_env: dict[str, str], model_path: Path,
                                                      tmp_path: Path, stage: str) -> None:
    child = spawn_chat(chat_env, "--verbose")
    child.expect(IN_LLAMA_CPP[stage])
    interrupt(child)
    assert_nothing_half_written(tmp_path)


def test_ctrl_c_after_the_model_has_loaded_and_the_server_started(chat_env: dict[str, str], model_path: Path,
                                                                  tmp_path: Path) -> None:
    child = spawn_chat(chat_env)
    child.expect("loading model")
    child.expect_exact(SHOW_CURSOR)  # the spinner is gone: the model is loaded
    # ctrl-s stops the terminal's output, so the chat blocks at its next write (the banner) and
    # stays in start-up for as long as we like; ctrl-c then comes through all the same.
    child.sendcontrol("s")
    time.sleep(3)  # the whole start-up takes about 2 s here
    output = interrupt(child)
    assert "type /help" not in output
    assert_nothing_half_written(tmp_path)


def test_ctrl_c_while_the_model_is_copied_into_the_cache_leaves_no_partial_copy(
        chat_env: dict[str, str], model_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    child = spawn_chat({**chat_env, "GEMMA_CHAT_CACHE_DIR": str(cache)})
    child.expect("copying the model once")
    interrupt(child)
    assert_nothing_half_written(tmp_path)
    # Whether the copy had finished or not, what is in the cache is the whole model or nothing.
    assert [path.stat().st_size for path in (cache / "models").iterdir()] in ([], [model_path.stat().st_size])


MODES = {"cli": ["--cli", "-p", "1, 2, 3,", "-n", "3000", "--ignore-eos"], "server": ["--server", "--nobrowser"]}


def start_piped(env: dict[str, str], mode: str, *args: str) -> subprocess.Popen:
    # As from a terminal: a shell without job control starts background jobs with SIGINT ignored.
    return subprocess.Popen([*GEMMA_CHAT, *MODES[mode], "--port", str(free_port()), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def sigint(process: subprocess.Popen) -> str:
    """SIGINT; the process must end at once with status 130. Returns the rest of its stderr."""
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=10)
    assert time.monotonic() - sent < 3
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    return stderr


@EARLY
@pytest.mark.parametrize("mode", list(MODES))
def test_sigint_early_in_a_piped_start_up(cli_env: dict[str, str], model_path: Path, mode: str,
                                          seconds: float) -> None:
    process = start_piped(cli_env, mode)
    time.sleep(seconds)
    assert sigint(process).strip() == ""


@pytest.mark.parametrize("mode", list(MODES))
def test_sigint_inside_llama_cpps_model_load(cli_env: dict[str, str], model_path: Path, mode: str) -> None:
    process = start_piped(cli_env, mode, "--verbose")
    assert process.stderr is not None
    while IN_LLAMA_CPP["model load"] not in (line := process.stderr.readline()):
        assert line, "llama.cpp's log ended before the model was loaded"
    sigint(process)

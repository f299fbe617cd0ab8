"""A crash inside llama.cpp ends with one line naming it and the way out (gemmachat/fatal.py).

Real faults in native code (an illegal instruction, a read of address 0) in a child process, and
gemma-chat itself in every mode, killed by the signals that llama.cpp's crashes send.
"""

from __future__ import annotations

import platform
import signal
import subprocess
import sys

import pexpect
import pytest

from gemmachat.fatal import MESSAGES
from test_faults import GEMMA_CHAT, LONG, REPO, _started
from test_server import ServerProcess

# ud2, the instruction x86 reserves for "illegal", run on a native thread as llama.cpp's OpenMP
# workers run (without the GIL), from a page mapped executable.
ILLEGAL_INSTRUCTION = """
import ctypes, mmap, threading
from gemmachat import fatal
fatal.install()
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(b"\\x0f\\x0b")
function = ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
worker = threading.Thread(target=function)
worker.start()
worker.join()
"""
NULL_READ = "from gemmachat import fatal; fatal.install(); import ctypes; ctypes.string_at(0)"


def assert_one_line(stderr: str, name: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"gemma-chat: {MESSAGES[name]}"], stderr


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or sys.platform == "win32",
                    reason="ud2 is an x86 instruction; the signals are POSIX")
@pytest.mark.parametrize(("code", "name"), [(ILLEGAL_INSTRUCTION, "SIGILL"), (NULL_READ, "SIGSEGV")],
                         ids=["ud2", "null-read"])
def test_a_real_fault_in_native_code_prints_its_line_and_keeps_its_status(code: str, name: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == -getattr(signal, name)  # the usual end: killed by the signal
    assert_one_line(result.stderr, name)


def test_cli_piped_killed_by_sigill(cli_env: dict[str, str]) -> None:
    process = subprocess.Popen([*GEMMA_CHAT, "--cli", *LONG], env=cli_env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _started(process)
    process.send_signal(signal.SIGILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGILL
    assert_one_line(stderr.decode(), "SIGILL")


def test_server_killed_by_sigbus(cli_env: dict[str, str]) -> None:
    server = ServerProcess(cli_env)
    try:
        server.process.send_signal(signal.SIGBUS)
        assert server.process.wait(30) == -signal.SIGBUS
    finally:
        server.stop()
    server._reader.join(10)
    assert server.lines[-1] == f"gemma-chat: {MESSAGES['SIGBUS']}", server.lines[-3:]


def test_chat_in_a_terminal_killed_by_sigsegv(cli_env: dict[str, str]) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "gemmachat", "--chat"], env={**cli_env, "PROMPT_TOOLKIT_NO_CPR": "1"},
                          encoding="utf-8", timeout=60, dimensions=(40, 200), cwd=str(REPO))
    child.expect(">>>")
    child.kill(signal.SIGSEGV)
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus == signal.SIGSEGV
    assert f"gemma-chat: {MESSAGES['SIGSEGV']}" in " ".join(child.before.split())

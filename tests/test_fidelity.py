"""Greedy output equals native llama.cpp's, token for token (bench/fidelity.py, for real).

The native `llama-completion` is built once from the llama.cpp source that the pinned
llama-cpp-python vendors (the native_tools fixture; several minutes the first time, cached after).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The native build lives in the real user's cache, not in the tests' throw-away HOME: it costs
# minutes and is the same for every run.
NATIVE_CACHE = os.environ.get("GEMMA_CHAT_BENCH_CACHE") or str(Path.home() / ".cache" / "gemma-chat-bench")


def fidelity(model_path: Path, cli_env: dict[str, str], prompts: list[str], *extra: str) -> str:
    """bench/fidelity.py's output for these prompts."""
    cli_env = {**cli_env, "GEMMA_CHAT_BENCH_CACHE": NATIVE_CACHE}
    command = [sys.executable, str(REPO / "bench" / "fidelity.py"), "--model", str(model_path),
               "-n", "24", "--flash-attn", "auto", "--no-write",
               "--ours", f"{sys.executable} -m gemmachat", *extra]
    for prompt in prompts:
        command += ["--prompt", prompt]
    result = subprocess.run(command, capture_output=True, text=True, env=cli_env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_cli_matches_native_llama_completion(model_path: Path, cli_env: dict[str, str], native_tools: Path) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):",
               "日本の首都は東京です。Translation:", "Q: What is 2 + 2?\nA:"]
    assert "4/4 match" in fidelity(model_path, cli_env, prompts)


def test_no_repack_matches_native_no_repack(model_path: Path, cli_env: dict[str, str], native_tools: Path) -> None:
    # The safe path that an AMX CPU takes by itself (gemmachat/cpu.py), forced here on any CPU.
    assert "2/2 match" in fidelity(model_path, cli_env, ["The capital of France is", "def fibonacci(n):"],
                                   "--no-repack")

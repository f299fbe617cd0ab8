"""Shared fixtures: the real default model, a real engine, and the real CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemmachat.engine import Engine, EngineOptions
from gemmachat.gguf import read_gguf
from gemmachat.model_path import default_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One cache for the whole run, so the default model is assembled once, not per test.
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def model_path(cache_dir: Path) -> Path:
    return default_model({"GEMMA_CHAT_CACHE_DIR": str(cache_dir)})


@pytest.fixture(scope="session")
def engine(model_path: Path):
    from gemmachat import llama_log

    llama_log.install(verbose=False)
    with Engine(model_path, read_gguf(model_path), EngineOptions(ctx_size=2048, threads=2)) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def server_env(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GEMMA_CHAT_")}
    env["GEMMA_CHAT_CACHE_DIR"] = str(cache_dir)
    env["HOME"] = str(tmp_path_factory.mktemp("home"))
    return env


@pytest.fixture
def cli_env(cache_dir: Path, tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GEMMA_CHAT_")}
    env["GEMMA_CHAT_CACHE_DIR"] = str(cache_dir)
    env["HOME"] = str(tmp_path / "home")
    return env


@pytest.fixture
def run_cli(cli_env: dict[str, str]):
    """Runs `python -m gemmachat ARGS` for real and returns the completed process (text mode)."""

    def run(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        binary = isinstance(input, bytes)
        return subprocess.run(
            [sys.executable, "-m", "gemmachat", *args],
            input=input, capture_output=True, text=not binary, timeout=timeout,
            env={**cli_env, **(env or {})}, cwd=REPO,
        )

    return run

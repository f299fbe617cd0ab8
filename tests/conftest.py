"""Shared fixtures: the real default model, a real engine, and the real CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:
    # Two workers share 2 cores (pyproject.toml's addopts, docs/testing.md). ggml's OpenMP threads
    # spin while they wait, so each worker's llama.cpp burnt the CPU the other needed: 960 CPU
    # seconds for the suite instead of 560. Passive waiting is OpenMP's own switch, read by every
    # process a test starts and, set before the imports below load llama.cpp, by this one's engine.
    # `-n 0` runs everything with llama.cpp's default. (How gemma-chat itself copes with a busy
    # CPU is tested with real hogs in tests/test_threads.py.)
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    # The workers run with COLUMNS=80, which rich and prompt_toolkit would take over the size of
    # the terminal a test opens for its child.
    for variable in ("COLUMNS", "LINES"):
        os.environ.pop(variable, None)

from gemmachat.engine import Engine, EngineOptions
from gemmachat.gguf import read_gguf
from gemmachat.model_path import default_model

REPO = Path(__file__).resolve().parent.parent


def clean_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without the user's GEMMA_CHAT_ settings, with the session's model cache."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GEMMA_CHAT_")}
    return {**env, "GEMMA_CHAT_CACHE_DIR": str(cache_dir), **extra}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One cache for the whole run, so the default model is assembled once, not per test.
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def model_path(cache_dir: Path) -> Path:
    return default_model({"GEMMA_CHAT_CACHE_DIR": str(cache_dir)})


@pytest.fixture(scope="session")
def engine(model_path: Path, cache_dir: Path):
    # llama.cpp crashing on this machine (a SIGILL, say) would kill pytest itself if it first
    # happened in process: try a decode in a child first, so that a crash fails these tests, with
    # its one line, and the run goes on to its summary.
    canary = subprocess.run([sys.executable, "-m", "gemmachat", "--cli", "-m", str(model_path), "-p", "Hi", "-n", "2"],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "GEMMA_CHAT_CACHE_DIR": str(cache_dir)})
    if canary.returncode < 0:
        pytest.fail(f"llama.cpp crashed on this machine (signal {-canary.returncode}): {canary.stderr.strip()}")
    from gemmachat import llama_log

    llama_log.install(verbose=False)
    with Engine(model_path, read_gguf(model_path), EngineOptions(ctx_size=2048, threads=2)) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def native_tools(pytestconfig: pytest.Config) -> Path:
    """llama.cpp's own tools, built from the vendored source once (bench/native.py): the first
    build takes minutes, so its progress goes to the terminal instead of a silent wait."""
    sys.path.insert(0, str(REPO))
    from bench import native

    if not native._built(native.pinned_version()):
        build_in_the_open(pytestconfig, "building native llama.cpp tools for the fidelity and bench tests "
                          "(several minutes, once; cached after)", REPO / "bench" / "native.py")
    return native.ensure_built()


@pytest.fixture(scope="session")
def native_command(native_tools: Path) -> Callable[[str], list[str]]:
    """A native tool's command line up to its own arguments, with --no-repack where gemma-chat
    keeps plain weight buffers (an AMX CPU, gemmachat/cpu.py): there native crashes without it."""
    from bench import native

    return native.native_command


@pytest.fixture(scope="session")
def portable_llama(pytestconfig: pytest.Config) -> None:
    """The llama-cpp-python build that packaging/build.py puts in the single file (kernels for
    every x86-64 CPU), built once in the open: about 9 minutes on 2 cores the first time."""
    from test_llama_build import cached_wheel  # loads the script without putting packaging/ on sys.path

    if cached_wheel(cuda=False) is None:
        build_in_the_open(pytestconfig, "building llama.cpp with kernels for every x86-64 CPU for the "
                          "single-file tests (about 9 minutes, once; cached after)", REPO / "packaging" / "llama_build.py")


@pytest.fixture(scope="session")
def rpc_backend(pytestconfig: pytest.Config) -> Path:
    """llama.cpp's RPC backend as a module (gemmachat/llama_source.py): about a minute the first
    time, so built in the open rather than by the first --rpc inside a test's timeout. Returns the
    cache it is in."""
    from gemmachat import llama_source

    version = llama_source.installed_version()
    if not llama_source.rpc_module_built(version):
        build_in_the_open(pytestconfig, "building llama.cpp's RPC backend for the --rpc tests (about a "
                          "minute, once; cached after)", REPO / "gemmachat" / "llama_source.py")
    # Tests run gemma-chat with HOME elsewhere: they pass this on as $GEMMA_CHAT_BENCH_CACHE.
    return llama_source.cache_dir(version).parent


def build_in_the_open(pytestconfig: pytest.Config, announcement: str, script: Path) -> None:
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    if hasattr(pytestconfig, "workerinput"):  # an xdist worker's reporter reaches no terminal; stderr does
        def write_line(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    else:
        write_line = pytestconfig.pluginmanager.getplugin("terminalreporter").write_line
    with capture.global_and_fixture_disabled():
        write_line(announcement)
        build = subprocess.Popen([sys.executable, str(script)], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert build.stderr is not None
        for line in build.stderr:
            write_line(f"  {line.rstrip()}")
        if build.wait() != 0:
            pytest.fail(f"{script.name} could not build llama.cpp (see above)")


@pytest.fixture(scope="module")
def server_env(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return clean_env(cache_dir, HOME=str(tmp_path_factory.mktemp("home")))


@pytest.fixture
def cli_env(cache_dir: Path, tmp_path: Path) -> dict[str, str]:
    return clean_env(cache_dir, HOME=str(tmp_path / "home"))


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

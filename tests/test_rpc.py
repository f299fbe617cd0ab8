"""--rpc and --rpc-worker for real: llama.cpp's RPC backend, two workers on 127.0.0.1, the model's
layers on them, and the text a local run prints."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemmachat.errors import UserError
from gemmachat.settings import parse_settings

REPO = Path(__file__).resolve().parent.parent
PROMPT = ("-p", "The capital of France is", "-n", "24", "--temp", "0")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_worker(env: dict[str, str], log: Path, *args: str,
                 program: tuple[str, ...] = (sys.executable, "-m", "gemmachat")) -> tuple[subprocess.Popen, int]:
    port = free_port()
    worker = subprocess.Popen([*program, "--rpc-worker", "--port", str(port), "-t", "1", *args],
                              stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env, cwd=REPO)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            pytest.fail(f"the worker exited with {worker.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return worker, port
        except OSError:
            time.sleep(0.1)
    worker.kill()
    pytest.fail(f"the worker did not listen on {port} within 30 s: {log.read_text()}")


def stop(worker: subprocess.Popen) -> None:
    worker.terminate()
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


@pytest.fixture
def env(cli_env: dict[str, str], rpc_backend: Path) -> dict[str, str]:
    return {**cli_env, "GEMMA_CHAT_BENCH_CACHE": str(rpc_backend)}


@pytest.fixture(scope="module")
def workers(rpc_backend: Path, server_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("workers")
    server_env = {**server_env, "GEMMA_CHAT_BENCH_CACHE": str(rpc_backend)}
    started = [start_worker(server_env, logs / f"worker{index}.log") for index in range(2)]
    yield ",".join(f"127.0.0.1:{port}" for _, port in started)
    for worker, _ in started:
        stop(worker)


def test_two_workers_print_the_local_text(run_cli, model_path: Path, workers: str, env: dict[str, str]) -> None:
    # The workers keep weights in llama.cpp's plain CPU buffers (RPC has no repacked layout), so
    # the local run to match is the one with --no-repack: the same kernels, the same arithmetic.
    local = run_cli("-m", str(model_path), "--cli", "--no-repack", *PROMPT)
    assert local.returncode == 0, local.stderr
    remote = run_cli("-m", str(model_path), "--rpc", workers, "-ngl", "999", "--cli", *PROMPT, env=env, timeout=120)
    assert remote.returncode == 0, remote.stderr
    assert remote.stderr == ""
    assert len(local.stdout.split()) > 5
    assert remote.stdout == local.stdout


def test_layers_really_go_to_the_workers(run_cli, model_path: Path, workers: str, env: dict[str, str]) -> None:
    done = run_cli("-m", str(model_path), "--rpc", workers, "-ngl", "999", "--cli", "--verbose",
                   "-p", "Hi", "-n", "1", env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = workers.split(",")
    assert f"RPC0[{first}] model buffer size" in done.stderr
    assert f"RPC0[{second}] model buffer size" in done.stderr
    assert "offloaded 19/19 layers" in done.stderr


def test_a_worker_killed_mid_reply_is_one_line(model_path: Path, workers: str, env: dict[str, str],
                                               tmp_path: Path) -> None:
    doomed, port = start_worker(env, tmp_path / "doomed.log")
    survivor = workers.split(",")[0]
    client = subprocess.Popen(
        [sys.executable, "-m", "gemmachat", "-m", str(model_path), "--rpc", f"{survivor},127.0.0.1:{port}",
         "-ngl", "999", "--cli", "-p", "Once upon a time", "-n", "4000", "--ignore-eos", "--temp", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert client.stdout is not None
        assert client.stdout.read(1), "no reply began"  # generating, with layers on both workers
        doomed.kill()
        doomed.wait()
        out, err = client.communicate(timeout=60)  # a hang fails here
    finally:
        client.kill()
        stop(doomed)
    lines = err.decode().strip().splitlines()
    assert client.returncode == 1, err
    assert lines == [f"gemma-chat: an RPC worker (--rpc {survivor},127.0.0.1:{port}) stopped answering: it was "
                     "stopped or crashed, or the network to it failed"]


def test_a_closed_port_is_one_line(run_cli, model_path: Path, env: dict[str, str]) -> None:
    port = free_port()
    started = time.monotonic()
    done = run_cli("-m", str(model_path), "--rpc", f"127.0.0.1:{port}", "-ngl", "999", "--cli", "-p", "Hi", "-n", "2",
                   env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"gemma-chat: cannot reach the RPC worker at 127.0.0.1:{port} (Connection refused): is `gemma-chat "
        f"--rpc-worker --host 127.0.0.1 --port {port}` running there?"]
    assert time.monotonic() - started < 30


def test_a_worker_on_another_address_warns_loudly(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "open.log"
    worker, _ = start_worker(env, log, "--host", "0.0.0.0")
    stop(worker)
    warning = [line for line in log.read_text().splitlines() if "WARNING" in line]
    assert len(warning) == 1
    assert "NO AUTHENTICATION" in warning[0] and "0.0.0.0" in warning[0]


def test_a_worker_on_localhost_does_not_warn_and_ctrl_c_stops_it(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "local.log"
    worker, port = start_worker(env, log)
    # The server runs inside one C call that never returns to Python: ctrl-c must still end it.
    worker.send_signal(signal.SIGINT)
    try:
        assert worker.wait(timeout=10) == 130
    finally:
        stop(worker)
    assert "WARNING" not in log.read_text()
    assert f"RPC worker on 127.0.0.1:{port}" in log.read_text()


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:", "host:0", "host:70000", ",", "a:1,b"])
def test_malformed_rpc_is_refused_in_words(value: str) -> None:
    with pytest.raises(UserError, match="--rpc expects HOST:PORT"):
        parse_settings(["--rpc", value, "--cli"], environ={})


def test_rpc_from_config_environment_and_flag_and_the_worker_port(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('rpc = "c:3"\n')
    assert parse_settings(["--cli"], environ={"GEMMA_CHAT_CONFIG": str(config)}).rpc == ("c:3",)
    assert parse_settings(["--cli"], environ={"GEMMA_CHAT_CONFIG": str(config), "GEMMA_CHAT_RPC": "a:1, b:2"}).rpc == ("a:1", "b:2")
    assert parse_settings(["--cli", "--rpc", "d:4"], environ={"GEMMA_CHAT_RPC": "a:1"}).rpc == ("d:4",)
    assert parse_settings(["--rpc-worker"], environ={}).port == 50052
    assert parse_settings(["--server"], environ={}).port == 8080
    with pytest.raises(UserError, match="--remote loads none here"):
        parse_settings(["--rpc", "a:1", "--remote", "http://x"], environ={})

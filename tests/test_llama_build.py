"""The builds of llama-cpp-python that packaging/llama_build.py makes, on this machine: loadable
CPU backends for every x86-64 CPU, and the CUDA backend, which has no NVIDIA driver here.

A build takes 15 (CPU) to 50 (CUDA) minutes on 2 cores, so these tests use one only when it is
in the build cache (a developer or the release workflow made it); otherwise they are skipped,
saying how to make it. The GPU side itself is measured on a GPU machine by bench/gpu.py.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROMPT = ("--cli", "-p", "The capital of France is", "--temp", "0")


def cached_wheel(cuda: bool) -> Path | None:
    # packaging/ is no package (and its name is taken by PyPI's `packaging`): load the script.
    spec = importlib.util.spec_from_file_location("llama_build", REPO / "packaging" / "llama_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cached_wheel(cuda)


def unpacked(wheel: Path | None, folder: Path) -> Path:
    """The wheel's llama_cpp package in `folder`, for PYTHONPATH ahead of the installed one."""
    if wheel is None:
        pytest.skip("no such build in the cache: run packaging/llama_build.py (--cuda)")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder, [name for name in archive.namelist() if name.startswith("llama_cpp/")])
    for library in (folder / "llama_cpp" / "lib").iterdir():
        library.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpacked(cached_wheel(cuda=True), tmp_path_factory.mktemp("cuda-build"))


@pytest.fixture(scope="module")
def portable_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Either build carries the CPU backends for every x86-64 CPU.
    wheel = cached_wheel(cuda=False) or cached_wheel(cuda=True)
    return unpacked(wheel, tmp_path_factory.mktemp("portable-build"))


def test_the_cuda_build_without_a_driver_runs_on_the_cpu(cuda_build: Path, run_cli) -> None:
    cpu = run_cli(*PROMPT, "-n", "24")
    cuda = run_cli(*PROMPT, "-n", "24", "-ngl", "999", env={"PYTHONPATH": f"{cuda_build}:{REPO}"})
    assert cuda.returncode == 0, cuda.stderr
    assert cuda.stderr.strip().splitlines() == ["gemma-chat: no GPU found, running on the CPU"]
    assert cuda.stdout == cpu.stdout and len(cpu.stdout) > 20
    verbose = run_cli(*PROMPT, "-n", "4", "-ngl", "999", "--verbose", env={"PYTHONPATH": f"{cuda_build}:{REPO}"})
    # --verbose names the CPU kernels chosen and why the GPU backend did not load (the first
    # library of CUDA's that this machine lacks).
    assert "loaded CPU backend from" in verbose.stderr
    assert "no GPU found, running on the CPU (lib" in verbose.stderr
    assert "cannot open shared object file" in verbose.stderr
    # and the chat's /show model names the kernels llama.cpp chose for this CPU.
    variant = re.search(r"libggml-cpu-(\w+)\.so", verbose.stderr)[1]
    shown = run_cli("--chat", "-n", "2", input="/show model\n", env={"PYTHONPATH": f"{cuda_build}:{REPO}"})
    assert re.search(rf"CPU kernels\s+{variant}\n", shown.stdout), shown.stdout


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-user (apt-get install qemu-user)")
def test_the_portable_build_runs_on_a_cpu_without_avx(portable_build: Path, run_cli, cli_env: dict[str, str],
                                                      model_path: Path) -> None:
    # qemu traps AVX and later instructions as a 2008 Nehalem would (SIGILL): llama.cpp must pick
    # the sse42 kernels, and they must answer as this machine's own build does.
    args = (*PROMPT, "-n", "8", "-c", "512", "-m", str(model_path))
    here = run_cli(*args)
    emulated = subprocess.run(["qemu-x86_64", "-cpu", "Nehalem", sys.executable, "-m", "gemmachat", *args, "--verbose"],
                              capture_output=True, text=True, timeout=600, cwd=REPO,
                              env={**cli_env, "PYTHONPATH": f"{portable_build}:{REPO}"})
    assert emulated.returncode == 0, emulated.stderr[-1000:]
    assert "libggml-cpu-sse42.so" in emulated.stderr
    assert emulated.stdout == here.stdout and len(here.stdout) > 10

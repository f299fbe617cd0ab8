"""The builds of llama-cpp-python that packaging/llama_build.py makes, on this machine: loadable
CPU backends for every x86-64 CPU, and the CUDA backend, which has no NVIDIA driver here.

A build takes 15 (CPU) to 50 (CUDA) minutes on 2 cores, so these tests use one only when it is
in the build cache (a developer or the release workflow made it); otherwise they are skipped,
saying how to make it. The GPU side itself is measured on a GPU machine by bench/gpu.py. The
portable CPU build on a CPU without AVX is tested where users run it, inside the single file
(tests/test_packaging.py, under qemu's Nehalem).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
PROMPT = ("--cli", "-p", "The capital of France is", "--temp", "0")


def llama_build() -> ModuleType:
    # packaging/ is no package (and its name is taken by PyPI's `packaging`): load the script.
    spec = importlib.util.spec_from_file_location("llama_build", REPO / "packaging" / "llama_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cached_wheel(cuda: bool) -> Path | None:
    return llama_build().cached_wheel(cuda)


def unpacked(wheel: Path | None, folder: Path) -> Path:
    """The wheel's llama_cpp package in `folder`, for PYTHONPATH ahead of the installed one."""
    if wheel is None:
        pytest.skip("no such build in the cache: run packaging/llama_build.py (--cuda)")
    return llama_build().unpack_llama_cpp(wheel, folder)


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpacked(cached_wheel(cuda=True), tmp_path_factory.mktemp("cuda-build"))


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

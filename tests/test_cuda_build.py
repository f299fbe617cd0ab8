"""The CUDA build of llama-cpp-python (packaging/llama_build.py --cuda) on this machine, which
has no NVIDIA driver: it must run on the CPU, say so once, and print the CPU's greedy text.

The build takes most of an hour on 2 cores, so the test uses it only when it is in the build cache
(a developer or the release workflow made it); otherwise it is skipped, saying how to make it.
The GPU side itself is measured on a GPU machine by bench/gpu.py (bench/results/gpu.md).
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def cached_wheel(cuda: bool) -> Path | None:
    # packaging/ is no package (and its name is taken by PyPI's `packaging`): load the script.
    spec = importlib.util.spec_from_file_location("llama_build", REPO / "packaging" / "llama_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cached_wheel(cuda)


@pytest.fixture(scope="module")
def cuda_llama_cpp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheel = cached_wheel(cuda=True)
    if wheel is None:
        pytest.skip("no CUDA build in the cache: run packaging/llama_build.py --cuda")
    folder = tmp_path_factory.mktemp("cuda-llama-cpp")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)
    for library in (folder / "llama_cpp" / "lib").iterdir():
        library.chmod(0o755)
    return folder


def test_without_a_driver_it_runs_on_the_cpu(cuda_llama_cpp: Path, run_cli) -> None:
    args = ("--cli", "-p", "The capital of France is", "-n", "24", "--temp", "0")
    cpu = run_cli(*args)
    # The CUDA build's llama_cpp package ahead of the installed one.
    cuda = run_cli(*args, "-ngl", "999", env={"PYTHONPATH": f"{cuda_llama_cpp}:{REPO}"})
    assert cuda.returncode == 0, cuda.stderr
    assert cuda.stderr.strip().splitlines() == ["gemma-chat: no GPU found, running on the CPU"]
    assert cuda.stdout == cpu.stdout and len(cpu.stdout) > 20
    verbose = run_cli(*args, "-ngl", "999", "--verbose", env={"PYTHONPATH": f"{cuda_llama_cpp}:{REPO}"})
    # --verbose names the CPU kernels chosen and why the GPU backend did not load (the first
    # library of CUDA's that this machine lacks).
    assert "loaded CPU backend from" in verbose.stderr
    assert "no GPU found, running on the CPU (lib" in verbose.stderr
    assert "cannot open shared object file" in verbose.stderr

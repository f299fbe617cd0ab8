"""Build llama-cpp-python for machines other than this one: every x86-64 CPU, and NVIDIA GPUs.

    python packaging/llama_build.py [--cuda] [--cuda-arch 90] [--tools] [--install]

pip's default build of llama-cpp-python compiles llama.cpp with -march=native: it runs only on
CPUs like the build machine's, and never on a GPU. This script builds the pinned version with
llama.cpp's loadable backends instead (docs/packaging.md):

- GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS: one CPU backend per x86-64 microarchitecture (x64,
  sse42, ..., haswell, skylakex, icelake, zen4, sapphirerapids), and llama.cpp loads the best one
  the CPU can run at start (gemmachat/backends.py points it at them);
- with --cuda, GGML_CUDA as one more loadable backend, built with NVIDIA's compiler from PyPI's
  wheels (nvidia-cuda-nvcc and friends, pinned below), for the GPU architectures of --cuda-arch.
  On a machine without NVIDIA's driver that backend fails to load and the CPU runs, as before.

The wheel is cached by everything that shapes it (version, flags), under
~/.cache/gemma-chat-build (GEMMA_CHAT_BUILD_CACHE): a second run prints its path at once.
--tools also builds llama-completion and llama-bench in the same tree, from the same libraries,
for bench/gpu.py. --install puts the wheel in the running Python's environment.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.native import pinned_version  # noqa: E402  one place for each
from gemmachat.llama_source import jobs as build_jobs  # noqa: E402

# NVIDIA's toolkit as PyPI wheels, CUDA 13.0: what driver 580 (the first for CUDA 13) runs without
# the forward-compatibility package. cuBLAS and the runtime are what the CUDA backend links.
CUDA_WHEELS = (
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cublas==13.0.2.14",
)
# Turing to Blackwell, as llama.cpp's own CUDA releases: 75 (T4, RTX 20), 80 (A100, RTX 30 with
# 86), 89 (RTX 40, L4), 90 (H100, H200), 120 (RTX 50). Each one adds build time and size.
DEFAULT_CUDA_ARCHS = "75;80;86;89;90;120"
# The CUDA runtime libraries the backend needs at run time (never the driver, libcuda.so), and
# the wheels that carry them.
CUDA_RUNTIME_LIBS = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13")
CUDA_RUNTIME_WHEELS = tuple(pin for pin in CUDA_WHEELS if pin.startswith(("nvidia-cuda-runtime", "nvidia-cublas")))

COMMON_CMAKE = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
)


def log(message: str) -> None:
    print(f"[llama_build] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    root = os.environ.get("GEMMA_CHAT_BUILD_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "gemma-chat-build"


def cmake_args(cuda: bool, cuda_archs: str, tools: bool) -> list[str]:
    args = list(COMMON_CMAKE)
    args.append(f"-DLLAMA_BUILD_TOOLS={'ON' if tools else 'OFF'}")
    if cuda:
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}"]
    return args


def cuda_toolkit() -> Path:
    """NVIDIA's compiler, headers and libraries from PyPI, in one folder laid out as a toolkit."""
    pins = "\n".join(CUDA_WHEELS)
    folder = cache_root() / f"cuda-{hashlib.sha256(pins.encode()).hexdigest()[:12]}"
    root = folder / "nvidia" / "cu13"
    if not (root / "bin" / "nvcc").is_file():
        log(f"installing NVIDIA's CUDA wheels into {folder}")
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                        str(folder), *CUDA_WHEELS], check=True)
    lib = root / "lib"
    # nvcc.profile looks for libraries in lib64, the wheels put them in lib.
    if not (root / "lib64").exists():
        (root / "lib64").symlink_to("lib")
    # The wheels carry only the versioned names; the linker looks for the plain ones.
    for name in CUDA_RUNTIME_LIBS:
        plain = lib / name.rsplit(".so", 1)[0]
        plain = plain.with_name(plain.name + ".so")
        if not plain.exists():
            plain.symlink_to(name)
    _driver_stub(root)
    return root


def _driver_stub(root: Path) -> None:
    """A stand-in libcuda.so to link against, as the toolkit's own stubs/ folder has (the wheels
    lack it): every driver function that cuda.h declares, doing nothing. At run time the real
    driver's libcuda.so.1 is loaded instead; the stub is never shipped."""
    stubs = root / "lib" / "stubs"
    stub = stubs / "libcuda.so"
    if stub.is_file():
        return
    stubs.mkdir(parents=True, exist_ok=True)
    # After the preprocessor, declarations carry their final names (cuMemGetInfo -> cuMemGetInfo_v2).
    declared = subprocess.run(["cc", "-E", "-I", str(root / "include"), "-x", "c", "-"],
                              input="#include <cuda.h>\n", capture_output=True, text=True, check=True).stdout
    names = sorted(set(re.findall(r"\bCUresult\s+(cu[A-Za-z0-9_]+)\s*\(", declared)))
    source = stubs / "libcuda_stub.c"
    source.write_text("".join(f"int {name}(void) {{ return 999; }}\n" for name in names))
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub), str(source)], check=True)
    log(f"driver stub with {len(names)} functions: {stub}")


def cached_wheel(cuda: bool) -> Path | None:
    """The newest wheel of that kind already built for the pinned version, whatever its flags."""
    kind = "cuda" if cuda else "cpu"
    wheels = []
    for done in cache_root().glob(f"llama-cpp-python-{pinned_version()}-{kind}-*/wheel.json"):
        wheel = Path(json.loads(done.read_text())["wheel"])
        if wheel.is_file():
            wheels.append(wheel)
    return max(wheels, key=lambda wheel: wheel.stat().st_mtime, default=None)


def unpack_llama_cpp(wheel: Path, folder: Path) -> Path:
    """The wheel's llama_cpp package, with the modes the wheel records, in `folder` (made afresh),
    to put ahead of an installed one on the path; returns `folder`."""
    shutil.rmtree(folder, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        for item in archive.infolist():
            if item.filename.startswith("llama_cpp/"):
                archive.extract(item, folder)
                (folder / item.filename).chmod(item.external_attr >> 16 or 0o644)
    return folder


def build(cuda: bool, cuda_archs: str, tools: bool) -> tuple[Path, Path]:
    """The wheel (built once per set of flags) and its build folder."""
    version = pinned_version()
    args = cmake_args(cuda, cuda_archs, tools)
    # The tools change nothing in the wheel: one cache entry serves builds with and without them.
    shape = cmake_args(cuda, cuda_archs, tools=True)
    key = hashlib.sha256(json.dumps([version, shape, CUDA_WHEELS if cuda else []]).encode()).hexdigest()[:12]
    folder = cache_root() / f"llama-cpp-python-{version}-{'cuda' if cuda else 'cpu'}-{key}"
    done = folder / "wheel.json"
    if done.is_file():
        wheel = Path(json.loads(done.read_text())["wheel"])
        if wheel.is_file() and (not tools or (folder / "build" / "bin" / "llama-completion").is_file()):
            return wheel, folder / "build"
    env = dict(os.environ, CMAKE_ARGS=" ".join(args), CMAKE_BUILD_PARALLEL_LEVEL=str(build_jobs()))
    if cuda:
        toolkit = cuda_toolkit()
        env.update(CUDACXX=str(toolkit / "bin" / "nvcc"), CUDAToolkit_ROOT=str(toolkit),
                   PATH=f"{toolkit / 'bin'}{os.pathsep}{env['PATH']}",
                   LIBRARY_PATH=f"{toolkit / 'lib' / 'stubs'}{os.pathsep}{env.get('LIBRARY_PATH', '')}")
        args.append(f"-DCUDAToolkit_ROOT={toolkit}")
        env["CMAKE_ARGS"] = " ".join(args)
    log(f"building llama-cpp-python {version} with {env['CMAKE_ARGS']} (this takes a while)")
    started = time.monotonic()
    wheels = folder / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary",
                    "llama-cpp-python", f"llama-cpp-python=={version}", "-w", str(wheels),
                    f"--config-settings=build-dir={folder / 'build'}"], env=env, check=True)
    [wheel] = wheels.glob("llama_cpp_python-*.whl")
    _add_backend_modules(wheel, folder / "build")
    minutes = (time.monotonic() - started) / 60
    done.write_text(json.dumps({"wheel": str(wheel), "cmake_args": args, "minutes": round(minutes, 1)}))
    log(f"built in {minutes:.1f} min: {wheel} ({wheel.stat().st_size / 1e6:.0f} MB)")
    return wheel, folder / "build"


def _add_backend_modules(wheel: Path, build_dir: Path) -> None:
    """llama-cpp-python installs the libraries it names (ggml-cpu, ggml-cuda, ...), not the CPU
    variants (ggml-cpu-haswell, ...): write the wheel again with them in llama_cpp/lib."""
    # libggml-cpu-haswell.so on Linux and macOS (CMake's suffix for modules), ggml-cpu-haswell.dll
    # on Windows, under bin/ or the Visual Studio generator's bin/Release/.
    modules = sorted(path for pattern in ("bin/*ggml-cpu-*.so", "bin/*ggml-cpu-*.dll", "bin/Release/ggml-cpu-*.dll")
                     for path in build_dir.glob(pattern))
    if not modules:
        raise SystemExit(f"llama_build: no CPU backend variants in {build_dir}/bin")
    partial = wheel.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as target:
        [record] = [name for name in source.namelist() if name.endswith(".dist-info/RECORD")]
        lines = [line for line in source.read(record).decode().splitlines() if line and not line.startswith(record)]
        for item in source.infolist():
            if item.filename != record:
                target.writestr(item, source.read(item))
        for module in modules:
            data = module.read_bytes()
            name = f"llama_cpp/lib/{module.name}"
            entry = zipfile.ZipInfo(name, date_time=time.localtime(module.stat().st_mtime)[:6])
            entry.external_attr = 0o755 << 16  # as pip installs the others: readable by every user
            entry.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(entry, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
        target.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    os.replace(partial, wheel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="add the CUDA backend (NVIDIA GPUs)")
    parser.add_argument("--cuda-arch", default=DEFAULT_CUDA_ARCHS, metavar="LIST",
                        help=f"GPU architectures, ';'-separated (default {DEFAULT_CUDA_ARCHS})")
    parser.add_argument("--tools", action="store_true",
                        help="also build llama-completion and llama-bench from the same libraries")
    parser.add_argument("--install", action="store_true", help="install the wheel into this Python")
    args = parser.parse_args(argv)
    wheel, build_dir = build(args.cuda, args.cuda_arch, args.tools)
    if args.install:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
                       check=True)
        if args.cuda:  # what the CUDA backend loads at run time (gemmachat/backends.py finds it)
            subprocess.run([sys.executable, "-m", "pip", "install", *CUDA_RUNTIME_WHEELS], check=True)
    print(wheel)
    if args.tools:
        print(build_dir / "bin")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

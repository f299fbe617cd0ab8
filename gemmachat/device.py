"""Names of the compute devices, for the banner: the CPU's model name, and GPUs llama.cpp sees."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

# ggml_backend_dev_type in ggml-backend.h
GGML_BACKEND_DEVICE_TYPE_GPU = 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def gpu_names() -> list[str]:
    """GPUs registered with llama.cpp's ggml backends (none in a CPU-only build)."""
    try:
        from llama_cpp.llama_cpp import _lib as library

        count = library.ggml_backend_dev_count
        get = library.ggml_backend_dev_get
        kind = library.ggml_backend_dev_type
        describe = library.ggml_backend_dev_description
    except (ImportError, AttributeError):
        return []
    count.restype = ctypes.c_size_t
    get.argtypes, get.restype = [ctypes.c_size_t], ctypes.c_void_p
    kind.argtypes, kind.restype = [ctypes.c_void_p], ctypes.c_int
    describe.argtypes, describe.restype = [ctypes.c_void_p], ctypes.c_char_p
    names = []
    for index in range(count()):
        device = get(index)
        if device and kind(device) == GGML_BACKEND_DEVICE_TYPE_GPU:
            names.append((describe(device) or b"GPU").decode("utf-8", errors="replace"))
    return names

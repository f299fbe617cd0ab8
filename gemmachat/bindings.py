"""llama.cpp's C API: llama-cpp-python's ctypes bindings, without the rest of that package.

`import llama_cpp` runs the package's __init__, which imports its high-level `Llama` class too,
and through it numpy, jinja2 and its chat formats: 0.1 to 0.2 s on 2 cores, a sixth of the chat's
start, for nothing gemma-chat uses (engine.py says why it drives the C API itself). So the package
goes into sys.modules without its __init__, holding what `from .llama_cpp import *` would have
put there. `import llama_cpp` anywhere after this gets that module; a program that imported the
whole package first keeps it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


def _bindings_only() -> ModuleType:
    if "llama_cpp" in sys.modules:
        return sys.modules["llama_cpp"]
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        raise ModuleNotFoundError("No module named 'llama_cpp'", name="llama_cpp")
    package = importlib.util.module_from_spec(spec)
    sys.modules["llama_cpp"] = package
    try:
        bindings = importlib.import_module("llama_cpp.llama_cpp")
    except BaseException:
        del sys.modules["llama_cpp"]
        raise
    package.__dict__.update((name, value) for name, value in vars(bindings).items() if not name.startswith("_"))
    return package


llama_cpp = _bindings_only()

from llama_cpp._ggml import libggml  # noqa: E402 - once the package is in place

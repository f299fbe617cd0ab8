# llama-cpp-python opens libllama and the ggml libraries itself through ctypes, so PyInstaller's
# analysis cannot see them: collect them as binaries (not data) so that their own dependencies
# (libgomp, libstdc++ ...) are analysed and collected too.
from PyInstaller.utils.hooks import collect_dynamic_libs

binaries = collect_dynamic_libs("llama_cpp")

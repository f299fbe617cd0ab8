"""Model hyperparameters that llama.cpp asserts on instead of returning an error.

A failed GGML_ASSERT ends the process (llama_log turns that into one line and exit 2, but only
when it happens). Values that would trip one are refused here, before llama.cpp sees them, so the
message names the key; the fuzz test in tests/test_hostile_gguf.py found these two, and the layer
norm one would otherwise only fire at the first decode: in the server, on a user's request.
"""

from __future__ import annotations

from gemmachat.gguf import GGUFError, GGUFInfo

# llama.cpp's src/llama-hparams.h
LLAMA_MAX_LAYERS = 512


def check_hyperparameters(info: GGUFInfo) -> None:
    """Raise GGUFError (one line) for a value llama.cpp would abort on."""
    blocks = info.arch_value("block_count")
    if isinstance(blocks, int) and not 1 <= blocks <= LLAMA_MAX_LAYERS:
        raise GGUFError(f"{info.architecture}.block_count is {blocks} (llama.cpp takes 1 to {LLAMA_MAX_LAYERS})")
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        epsilon = info.arch_value(key)
        if isinstance(epsilon, float) and not epsilon >= 0:  # also NaN
            raise GGUFError(f"{info.architecture}.{key} is {epsilon} (it must be 0 or more)")

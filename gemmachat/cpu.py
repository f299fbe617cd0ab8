"""What this CPU and this llama.cpp build can run safely: the AMX decision.

On an Intel Xeon with AMX (Sapphire Rapids and later), pip's -march=native build of llama.cpp
compiles its AMX kernels in, and they die with SIGILL (`tilezero`) at the first decode, native
llama.cpp programs too (llama.cpp PR #26954, open). llama.cpp reaches those kernels only through
its "extra buffer types", where weights are laid out for special kernels (AMX first, then the
AVX2/AVX-512 repacked ones). Without them (`use_extra_bufts = False`, llama.cpp's --no-repack)
every weight stays in a plain CPU buffer and the ordinary kernels run. So: the extra buffers are
used unless --no-repack, or unless both the CPU and the build have AMX. docs/performance.md
gives what that costs where repacking would have helped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gemmachat.bindings import llama_cpp as llama

AMX_CPU_FLAGS = ("amx_tile", "amx_int8")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux; elsewhere none are known, and none are needed)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def build_features() -> dict[str, str]:
    """llama.cpp's own account of what its CPU backend was built with ("AVX512": "1", ...), from
    llama_print_system_info(); call it after the backends are loaded."""
    text = llama.llama_print_system_info().decode("utf-8", errors="replace")
    features = {}
    for part in text.split("|"):
        name, _, value = part.rpartition("=")
        name = name.rpartition(":")[2].strip()
        if name:
            features[name] = value.strip()
    return features


@dataclass(frozen=True)
class RepackDecision:
    use_extra_buffers: bool
    reason: str  # why not, for --verbose and /show; "" when they are used


def decide_repack(no_repack: bool, flags: frozenset[str] | None = None,
                  features: dict[str, str] | None = None) -> RepackDecision:
    if no_repack:
        return RepackDecision(False, "--no-repack")
    flags = cpu_flags() if flags is None else flags
    features = build_features() if features is None else features
    if all(flag in flags for flag in AMX_CPU_FLAGS) and features.get("AMX_INT8") == "1":
        return RepackDecision(False, "this CPU has AMX, whose llama.cpp kernels crash (SIGILL)")
    return RepackDecision(True, "")

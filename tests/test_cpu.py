"""The AMX decision (gemmachat/cpu.py), on this machine's real CPU and real llama.cpp build."""

from __future__ import annotations

from pathlib import Path

import llama_cpp

from gemmachat.cpu import build_features, cpu_flags, decide_repack


def test_the_engine_repacks_unless_cpu_and_build_both_have_amx(engine) -> None:
    # Read the facts here as a person would, not through the module under test.
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    system_info = llama_cpp.llama_print_system_info().decode()
    amx_everywhere = {"amx_tile", "amx_int8"} <= flags and "AMX_INT8 = 1" in system_info
    assert engine.repack.use_extra_buffers is (not amx_everywhere)
    assert ("AMX" in engine.repack.reason) is amx_everywhere


def test_what_the_decision_reads_is_this_machine() -> None:
    flags, features = cpu_flags(), build_features()
    assert flags and {"sse2", "fpu"} <= flags  # any x86-64 CPU
    assert features.get("AVX2") == ("1" if "avx2" in flags else None) or "AVX2" not in features
    # The build never claims an instruction set the CPU lacks: that would be the SIGILL of issue #17.
    for feature, flag in (("AVX512", "avx512f"), ("AMX_INT8", "amx_int8"), ("AVX2", "avx2")):
        if features.get(feature) == "1":
            assert flag in flags, feature


def test_amx_in_both_turns_repacking_off_and_says_why() -> None:
    amx_cpu = frozenset({"avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"})
    decision = decide_repack(False, amx_cpu, {"AVX512": "1", "AMX_INT8": "1"})
    assert not decision.use_extra_buffers and "AMX" in decision.reason
    # An AMX CPU running a build without AMX kernels (a portable build's non-AMX variant) is safe.
    assert decide_repack(False, amx_cpu, {"AVX512": "1"}).use_extra_buffers
    # And --no-repack is obeyed on any CPU.
    forced = decide_repack(True, frozenset({"avx2"}), {"AVX2": "1"})
    assert not forced.use_extra_buffers and forced.reason == "--no-repack"

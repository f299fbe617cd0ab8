"""bench/run.py reads the real output of both sides correctly (no timings are asserted here).

The benchmark takes its figures from gemma-chat's --verbose line and from llama-completion's
perf report; if either format changes, the bench must fail loudly rather than report nonsense.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import native, run  # noqa: E402


@pytest.fixture(scope="module")
def sides(model_path: Path, native_tools: Path) -> run.Sides:
    return run.Sides(model_path, run.Plan(reps=1, speed_reps=1, gen_tokens=6, prompt_tokens=0, reply_tokens=0,
                                          client_tokens=0, threads=2, ctx=2048, parallel=1),
                     aligned_malloc=native.aligned_malloc_library())


def test_both_sides_report_the_same_prompt_and_generation(sides: run.Sides) -> None:
    # As the generation and prompt rows run them: with bench/aligned_malloc.c preloaded.
    args = ("-p", run.GENERATION_PROMPT, "-n", "6", "--temp", "0", "--ignore-eos")
    ours = run.run_process(sides.ours("--cli", *args, "--verbose"), preload=sides.aligned_malloc)
    theirs = run.run_process(sides.completion(*args), preload=sides.aligned_malloc)
    prompt_tokens, prompt_rate, generated, generation_rate = run.ours_stats(ours.stderr)
    native_prompt_tokens, native_prompt_rate = run.native_prompt_rate(theirs.stderr)
    assert generated == 6 and prompt_tokens == native_prompt_tokens > 5
    assert prompt_rate > 0 and generation_rate > 0 and native_prompt_rate > 0
    # Both sides' llama.cpp counters: 5 generation steps after the token sampled from the prompt.
    runs, eval_ms, sampling_ms = run.native_eval(theirs.stderr)
    assert runs == 5 and eval_ms > 0 and sampling_ms > 0
    assert run.ours_eval_rate(ours.stderr) > 0 and run.ours_prompt_eval_rate(ours.stderr) > 0
    assert "eval " in ours.stderr and "/ 5 runs" in ours.stderr
    # llama.cpp rebuilds the compute graph unless each step's batch has the same shape; native
    # reuses it for every step after the first, and so must we.
    native_reused = re.search(r"graphs reused =\s*(\d+)", theirs.stderr)
    assert native_reused and f"graphs reused {native_reused[1]}" in ours.stderr and int(native_reused[1]) >= 4
    # Same llama.cpp, same greedy chain: the same text (the fidelity test checks this in depth).
    assert ours.stdout == theirs.stdout.removesuffix("\n\n")
    assert ours.peak_rss > 100 * run.MIB and theirs.peak_rss > 100 * run.MIB


# Where malloc put blocks of these sizes, modulo 64, in a fresh Python process.
_ALIGNMENTS = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
print(*(libc.malloc(size) % 64 for size in (256 * 1024, 2244800, 5 << 20)))
"""


def test_the_preloaded_malloc_aligns_large_blocks_to_64_bytes(sides: run.Sides) -> None:
    command = [sys.executable, "-c", _ALIGNMENTS]
    assert run.run_process(command, preload=sides.aligned_malloc).stdout.split() == ["0", "0", "0"]
    # glibc alone puts a block it maps at 16 bytes into its page: the case the library is there for.
    assert "16" in run.run_process(command).stdout.split()
    with pytest.raises(RuntimeError, match="was not preloaded"):
        run.run_process(command, preload=sides.aligned_malloc.with_name("missing.so"))


def test_a_failed_run_is_an_error_not_a_figure(sides: run.Sides) -> None:
    with pytest.raises(RuntimeError, match="exited with"):
        run.run_process(sides.ours("--cli", "-p", "x", "-n", "1", "--ctx-size", "-5"))
    with pytest.raises(RuntimeError, match="no statistics line"):
        run.ours_stats("some other output")
    with pytest.raises(RuntimeError, match="no llama.cpp decode times"):
        run.ours_eval_rate("some other output")


def test_row_targets() -> None:
    faster = run.Row("s", "r", "tokens/s", ours=[98, 99, 120], native=[100, 100, 100], min_ratio=0.97)
    assert faster.ours_median == 99 and faster.ratio == pytest.approx(0.99) and faster.ok is True
    slower = run.Row("s", "r", "s", ours=[1.2], native=[1.0], max_ratio=1.08)
    assert slower.ok is False
    limited = run.Row("s", "r", "x", ours=[2.5], limit=2.0)
    assert limited.ok is False and limited.ratio is None
    assert run.Row("s", "r", "x").ok is None


def test_rows_count_the_alternations_ours_was_ahead_in() -> None:
    rate = run.Row("s", "r", "tokens/s", ours=[98, 99, 120], native=[100, 100, 100], min_ratio=0.97)
    assert rate.ahead == "ours ahead in 1 of 3 alternations"
    wall = run.Row("s", "r", "s", ours=[1.0, 1.2], native=[1.1, 1.1], higher_is_better=False, max_ratio=1.08)
    assert wall.ahead == "ours ahead in 1 of 2 alternations"
    assert run.Row("s", "r", "x", ours=[2.5], limit=2.0).ahead == ""
    notes = run.row_notes([rate, run.Row("s", "plain", "x", ours=[1, 2], native=[1, 2])])
    assert notes == ["r: ours ahead in 1 of 3 alternations"]


def test_every_side_takes_every_place_in_the_run_order() -> None:
    order: list[str] = []
    run.alternate(6, lambda: order.append("ours"), lambda: order.append("completion"),
                  lambda: order.append("bench"))
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert rounds[:3] == [["ours", "completion", "bench"], ["completion", "bench", "ours"],
                          ["bench", "ours", "completion"]]
    for place in range(3):
        assert sorted(r[place] for r in rounds) == ["bench", "bench", "completion", "completion", "ours", "ours"]
    pair: list[str] = []
    run.alternate(2, lambda: pair.append("ours"), lambda: pair.append("native"))
    assert pair == ["ours", "native", "native", "ours"]

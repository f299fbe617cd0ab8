"""The busy-machine rows of bench/run.py: generation speed while other processes keep every CPU busy.

The bench starts one CPU hog (`yes > /dev/null`) per CPU this process may use, measures, and
stops them. In each mode (--cli, the chat, the server) it measures gemma-chat at its defaults,
at -t 1 and at -t N (N = the CPUs), and native llama-completion at its defaults and at -t 1, the
settings alternating run by run. The target (issue #17): ours at its defaults reaches at least
0.8x of the best fixed -t measured in the same run. The idle rows of the same run (generation,
prompt) show that the adaptation costs nothing when nothing else runs.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
from collections.abc import Iterator
from typing import Callable

from bench import native
from bench.parallel import Server, _round
from bench.run import (GENERATION_PROMPT, REPO_ROOT, Row, Sides, _env, alternate, free_port, log, native_eval,
                       ours_stats, run_process)
from gemmachat.threads import usable_cpus

# Short: at -t N beside the hogs, llama.cpp generates about 20 times slower than at -t 1.
BUSY_TOKENS = 32
_CHAT_RATE = re.compile(r"(\d+) tokens generated at ([\d.]+) tokens/s")


@contextlib.contextmanager
def hogs(count: int) -> Iterator[None]:
    """`count` processes that each keep a CPU busy, as a compile or a browser tab would."""
    processes = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _best_fixed(row: Row, fixed: dict[str, list[float]]) -> None:
    """The row's comparison side: whichever fixed -t was fastest (by median) in this run."""
    name, rates = max(fixed.items(), key=lambda item: statistics.median(item[1]))
    row.native, row.native_name = rates, f"ours {name} (best fixed)"


def busy_rows(s: Sides, reps: int) -> list[Row]:
    cpus = len(usable_cpus())
    settings = {"default": (), "-t 1": ("-t", "1"), f"-t {cpus}": ("-t", str(cpus))}
    args = ("-p", GENERATION_PROMPT, "-n", str(BUSY_TOKENS), "--temp", "0", "--ignore-eos")
    section = f"busy ({cpus} CPU hogs)"
    rows = []

    # --cli, ours: the tokens/s of our own --verbose summary (generation only, after the prompt).
    cli: dict[str, list[float]] = {name: [] for name in settings}
    theirs: dict[str, list[float]] = {"default": [], "-t 1": []}

    def ours_cli(name: str) -> Callable[[], None]:
        def step() -> None:
            proc = run_process([*s.ours("--cli", *args, "--verbose"), *settings[name]])
            cli[name].append(ours_stats(proc.stderr)[3])
        return step

    def native_cli(name: str) -> Callable[[], None]:
        def step() -> None:
            command = s.completion(*args)
            if name == "-t 1":
                command[command.index("-t") + 1] = "1"
            else:  # native's own default thread count
                del command[command.index("-t"):command.index("-t") + 2]
            runs, eval_ms, sampling_ms = native_eval(run_process(command).stderr)
            theirs[name].append(runs / ((eval_ms + sampling_ms) / 1000))
        return step

    # The chat: one message through piped stdin, then /stats for the reply's tokens/s.
    chat: dict[str, list[float]] = {name: [] for name in settings}

    def ours_chat(name: str) -> Callable[[], None]:
        def step() -> None:
            command = [*s.ours("--chat", "--plain", "-n", str(BUSY_TOKENS), "--ignore-eos"),
                       *settings[name]]
            proc = subprocess.run(command, input=f"{GENERATION_PROMPT}\n/stats\n", capture_output=True,
                                  text=True, timeout=900, env=_env(), cwd=REPO_ROOT)
            found = _CHAT_RATE.search(proc.stdout)
            if proc.returncode != 0 or not found:
                raise RuntimeError(f"the chat gave no /stats line (exit {proc.returncode}): {proc.stderr[-400:]}")
            chat[name].append(float(found[2]))
        return step

    # The server: one client, the whole request (its prompt is a dozen tokens).
    server: dict[str, list[float]] = {name: [] for name in settings}

    def ours_server(name: str) -> Callable[[], None]:
        def step() -> None:
            port = free_port()
            command = [*s.ours("--server", "--port", str(port), "-np", "1"), *settings[name]]
            with Server(command, port) as running:
                generated, seconds = _round(running.base, 1, BUSY_TOKENS)
            server[name].append(generated / seconds)
        return step

    log(f"busy machine: {cpus} hogs; --cli, chat and server × {reps}")
    with hogs(cpus):
        alternate(reps, *(ours_cli(name) for name in settings), *(native_cli(name) for name in theirs))
        alternate(reps, *(ours_chat(name) for name in settings))
        alternate(reps, *(ours_server(name) for name in settings))

    for mode, rates in (("--cli", cli), ("chat", chat), ("server", server)):
        for name, values in rates.items():
            row = Row(section, f"{mode}, ours {name}", "tokens/s")
            row.ours = values
            rows.append(row)
        target = Row(section, f"{mode}: ours at its defaults vs its best fixed -t", "tokens/s",
                     target="≥ 0.8x", min_ratio=0.8)
        target.ours = rates["default"]
        _best_fixed(target, {name: values for name, values in rates.items() if name != "default"})
        rows.append(target)
    for name, values in theirs.items():
        row = Row(section, f"--cli, native llama-completion {name}", "tokens/s",
                  note="decode + sampling by its own timers")
        row.ours, row.native, row.native_name = cli["default"], values, f"llama-completion {name}"
        rows.append(row)
    return rows

"""Start-up and speed of the single file (packaging/build.py) against the source install.

Each case is timed in a fresh process: to the first byte of the completion of
`--cli -p PROMPT -n 1 --temp 0` (start, model load, prompt, one token), to its exit, and `--help`.
The single file is run once first so that its program is already unpacked into the cache: what
is timed is every later start. Its first start is timed too, each run with an empty cache folder
(the program unpacked, the weights used in place). Generation speed (`-n 128 --ignore-eos`,
llama.cpp's tokens/s as --verbose reports it) compares the kernels the single file picks at run
time with the source install's, built for this CPU. If a --external variant is given (a file built
with --external-model, which carries no weights), it is timed too: its start against the
embedded one's shows whether the start grows with the weights. The runs of each round alternate
their order, because the machine is shared and its load drifts.

Usage:
    python bench/startup_single_file.py [--file dist/gemma-chat] [--external PATH] [--runs 7]
Writes bench/results/startup_single_file.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
PROMPT = "The capital of France is"


def time_run(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds to the first byte on stdout and to the exit of one fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=env["HOME"])
    first = process.stdout.read(1)
    first_byte = time.perf_counter() - start
    process.stdout.read()
    if process.wait() != 0 or not first:
        raise SystemExit(f"startup_single_file: {command[0]} failed (exit {process.returncode})")
    return first_byte, time.perf_counter() - start


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    return " ".join(flag for flag in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if flag in flags) or "unknown"


def generation_speed(command: list[str], env: dict[str, str]) -> float:
    """Tokens/s of 128 generated tokens, as llama.cpp's timers give them (--verbose)."""
    run = subprocess.run(command + ["--cli", "-p", PROMPT, "-n", "128", "--ignore-eos", "--temp", "0", "--verbose"],
                         capture_output=True, text=True, env=env, cwd=env["HOME"])
    found = re.search(r"generated (\d+) tokens, ([\d.]+) tokens/s", run.stderr)
    if run.returncode != 0 or not found:
        raise SystemExit(f"startup_single_file: {command[0]} failed (exit {run.returncode}): {run.stderr[-500:]}")
    return float(found[2])


CHAT_PROMPT = ">>>\x1b\\["  # a fresh prompt: ">>>" then cursor movement (bench/run.py's)


def chat_start(command: list[str], env: dict[str, str], ready: str) -> float:
    """Seconds from launch until the interactive prompt `ready` is on the terminal."""
    import pexpect

    start = time.perf_counter()
    child = pexpect.spawn(command[0], command[1:], env={**env, "PROMPT_TOOLKIT_NO_CPR": "1"}, cwd=env["HOME"],
                          timeout=120, encoding="utf-8", dimensions=(40, 120))
    child.expect(ready)
    seconds = time.perf_counter() - start
    child.terminate(force=True)
    child.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=REPO / "dist" / "gemma-chat")
    parser.add_argument("--external", type=Path, help="a --external-model build, its GGUF beside it")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if not args.file.is_file():
        print(f"startup_single_file: no {args.file}: build it with python packaging/build.py", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    try:
        return measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # two unpacked programs and model copies


def measure(args: argparse.Namespace, work: Path) -> int:
    home = work / "home"
    home.mkdir()
    # The source install runs with the venv's python and the default model already in a cache,
    # as a user's second start would; the single file runs with a bare environment, as downloaded.
    source_env = {**os.environ, "HOME": str(home), "GEMMA_CHAT_CACHE_DIR": str(work / "source-cache")}
    bare_env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    cli = ["--cli", "-p", PROMPT, "-n", "1", "--temp", "0"]
    programs = {"source": ([sys.executable, "-m", "gemmachat"], source_env),
                "single file": ([str(args.file.resolve())], bare_env)}
    if args.external:
        programs["single file, external model"] = ([str(args.external.resolve())], bare_env)
    for command, env in programs.values():  # first starts: assemble or unpack, not timed
        time_run(command + cli, env)

    sys.path.insert(0, str(REPO))
    from bench import native
    from gemmachat.model_path import default_model

    model = default_model(source_env)
    native_chat = ([*native.native_command("llama-completion"), "-m", str(model), "-c", "8192", "-cnv",
                    "--color", "off"], dict(os.environ, HOME=str(home)))
    chat_starts: dict[str, list[float]] = {"source": [], "single file": [], "llama-completion -cnv": []}
    first_start = "single file, first start (empty cache)"
    samples: dict[str, dict[str, list[float]]] = {name: {"first_token": [], "cli_total": [], "help": [],
                                                         "tokens_per_s": []} for name in programs}
    samples[first_start] = {"first_token": [], "cli_total": []}
    for round_ in range(args.runs):
        order = [*programs, first_start]
        for name in order if round_ % 2 == 0 else reversed(order):
            if name == first_start:
                fresh = work / f"fresh-cache-{round_}"
                first_token, total = time_run(programs["single file"][0] + cli,
                                              {**bare_env, "GEMMA_CHAT_CACHE_DIR": str(fresh)})
                shutil.rmtree(fresh)
            else:
                command, env = programs[name]
                first_token, total = time_run(command + cli, env)
                samples[name]["help"].append(time_run(command + ["--help"], env)[1])
                samples[name]["tokens_per_s"].append(generation_speed(command, env))
            samples[name]["first_token"].append(first_token)
            samples[name]["cli_total"].append(total)
        chats = list(chat_starts) if round_ % 2 == 0 else list(reversed(chat_starts))
        for name in chats:
            if name == "llama-completion -cnv":
                chat_starts[name].append(chat_start(native_chat[0], native_chat[1], "\n> "))
            else:
                command, env = programs[name]
                chat_starts[name].append(chat_start(command + ["--nologo", "--port", "18765"], env, CHAT_PROMPT))

    medians = {name: {key: statistics.median(values) for key, values in measures.items()}
               for name, measures in samples.items()}
    ratios = {name: {key: medians[name][key] / medians["source"][key] for key in medians[name]}
              for name in medians if name != "source"}
    first_to_later = {key: medians[first_start][key] / medians["single file"][key] for key in medians[first_start]}
    chat_medians = {name: statistics.median(values) for name, values in chat_starts.items()}
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, shared with other jobs",
        "load_average_at_end": os.getloadavg(),
        "runs": args.runs,
        "file_bytes": args.file.stat().st_size,
        "command": f"--cli -p {PROMPT!r} -n 1 --temp 0; --help",
        "samples_s": samples,
        "medians_s": medians,
        "ratios_to_source": ratios,
        "first_start_to_later_starts": first_to_later,
        "chat_start_s": chat_starts,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "startup_single_file.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Single-file start-up against the source install",
        "",
        f"{result['date']}, {result['machine']}, load average at the end {result['load_average_at_end'][0]:.1f}; "
        f"median of {args.runs} runs, alternating order; single file {args.file.stat().st_size / 1e6:.0f} MB; "
        f"CPU {cpu_flags()}.",
        "",
        "| program | first token (`--cli -n 1`) | `--cli -n 1` exit | `--help` | generation, tokens/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in medians.items():
        r = ratios.get(name)
        cells = [f"{m[key]:.2f} s" + (f" ({r[key]:.2f}x)" if r else "") if key in m else "–"
                 for key in ("first_token", "cli_total", "help")]
        speed = m.get("tokens_per_s")
        cells.append("–" if speed is None else f"{speed:.1f}" + (f" ({r['tokens_per_s']:.2f}x)" if r else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios are to the source install (`python -m gemmachat` from its virtual environment).",
              f"First start (empty cache: the program unpacked, the weights used in place) against later "
              f"starts: {first_to_later['first_token']:.2f}x to the first token, "
              f"{first_to_later['cli_total']:.2f}x to the exit (target ≤ 1.3x).",
              "",
              "| launch to the first prompt (the chat with its server; native: its first `> `) | median | / native |",
              "| --- | --- | --- |",
              *[f"| {name} | {value:.2f} s | {value / chat_medians['llama-completion -cnv']:.2f}x |"
                for name, value in chat_medians.items()],
              "",
              "Target: at most 1.1x native's, from source and from the single file.",
              "Command: `python bench/startup_single_file.py` (see its docstring)."]
    (RESULTS_DIR / "startup_single_file.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

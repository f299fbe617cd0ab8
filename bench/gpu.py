"""gemma-chat on an NVIDIA GPU against native llama.cpp on the same GPU: one prepared run.

Both sides use the same libraries: packaging/llama_build.py --cuda --tools builds llama-cpp-python
with the CUDA backend and, in the same build tree, llama-completion and llama-bench. On the GPU
machine:

    GEMMA_CHAT_NATIVE_BIN=<build>/bin python bench/gpu.py --model M.gguf --out DIR

measures, all at -ngl 999 (every layer on the GPU):
- fidelity: greedy --cli against llama-completion on the same prompts (bench/fidelity.py);
- generation and prompt tokens/s against llama-completion's timers and llama-bench, alternating
  (the rows of bench/run.py, without the CPU heap-alignment preload);
- launch to the first token of --cli against llama-completion;
- our server's aggregate tokens/s with 4 concurrent clients over 1 (-np 4);
and writes DIR/gpu.md and DIR/gpu.json, headed by the GPU's name, driver and the CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import fidelity, native  # noqa: E402
from bench.parallel import Server, _round  # noqa: E402
from bench.run import (MIB, Plan, Row, Sides, first_token_row, free_port, generation_rows, log,  # noqa: E402
                       long_prompt, prompt_rows, row_notes, table_rows, HEADER)

ALL_LAYERS = ("-ngl", "999")


def gpu_facts() -> dict[str, str]:
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True)
        gpu = query.stdout.strip() or f"nvidia-smi failed: {query.stderr.strip()[-200:]}"
    except FileNotFoundError:
        gpu = "none (no nvidia-smi)"
    facts = native.cpu_facts()
    facts["gpu"] = gpu
    facts["cpus"] = str(os.cpu_count())
    facts["python"] = platform.python_version()
    return facts


def server_gain(s: Sides, reps: int, tokens: int) -> Row:
    """Aggregate tokens/s of 4 concurrent clients over 1, our server with -np 4 on the GPU."""
    row = Row("server", f"4 clients / 1 client, aggregate tokens/s, -np 4, {tokens} tokens each", "x",
              note="ours only (llama-server is not built here); the best of the rounds")
    port = free_port()
    with Server(s.ours("--server", "--port", str(port), "-np", "4"), port) as running:
        best = {1: 0.0, 4: 0.0}
        for _ in range(reps):
            for clients in best:
                generated, seconds = _round(running.base, clients, tokens)
                best[clients] = max(best[clients], generated / seconds)
    row.ours = [best[4] / best[1]]
    row.note += f": 1 client {best[1]:.0f} tokens/s, 4 clients {best[4]:.0f} tokens/s"
    return row


def fidelity_summary(model: pathlib.Path, out: pathlib.Path) -> str:
    """bench/fidelity.py at -ngl 999 on its built-in prompts; its table goes to out/fidelity.txt."""
    command = [sys.executable, str(REPO_ROOT / "bench" / "fidelity.py"), "--model", str(model), "-n", "48",
               "--no-write", "--ours", f"{sys.executable} -m gemmachat",
               *(f"--both-arg={arg}" for arg in ALL_LAYERS)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    (out / "fidelity.txt").write_text(done.stdout + done.stderr)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if " match" in line]
    return lines[-1].strip() if lines else f"fidelity.py exited {done.returncode}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--reps", type=int, default=5, help="alternations per speed row (default 5)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0))
    plan = Plan(reps=3, speed_reps=args.reps, gen_tokens=256, prompt_tokens=2000, reply_tokens=32,
                client_tokens=128, threads=cpus, ctx=8192, parallel=4)
    s = Sides(args.model, plan, extra=ALL_LAYERS)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **gpu_facts(),
            "model": args.model.name, "gguf_mib": round(args.model.stat().st_size / MIB),
            "llama_cpp_commit": (native.llama_cpp_commit() or "unknown")[:10], "plan": plan.__dict__}
    log(f"{meta['gpu']}; {meta['cpu_flags']}")
    meta["fidelity"] = fidelity_summary(args.model, args.out)
    log(f"fidelity at -ngl 999: {meta['fidelity']}")
    rows = generation_rows(s)
    with tempfile.TemporaryDirectory() as folder:
        prompt_file = pathlib.Path(folder) / "prompt.txt"
        prompt_file.write_text(long_prompt(plan.prompt_tokens), encoding="utf-8")
        rows += prompt_rows(s, prompt_file)
    rows.append(first_token_row(s))
    rows.append(server_gain(s, plan.reps, plan.client_tokens))
    lines = [f"# gemma-chat on a GPU vs native llama.cpp, -ngl 999", "",
             f"- {meta['date']}; GPU: {meta['gpu']}; {meta['cpus']} CPUs ({meta['cpu_flags']}); Python {meta['python']}",
             f"- llama.cpp: `{meta['llama_system_info']}`; model `{meta['model']}` ({meta['gguf_mib']} MiB)",
             f"- greedy fidelity, --cli vs llama-completion, 48 tokens: **{meta['fidelity']}**",
             f"- {plan.speed_reps} alternations per speed row; medians; both sides built together by "
             "packaging/llama_build.py --cuda --tools", "",
             "| " + " | ".join(HEADER) + " |", "| " + " | ".join("---" for _ in HEADER) + " |",
             *("| " + " | ".join(cells) + " |" for cells in table_rows(rows)), "",
             *(f"- {note}" for note in row_notes(rows))]
    (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
    (args.out / "gpu.json").write_text(json.dumps(
        {**meta, "rows": [{**row.__dict__, "ratio": row.ratio, "ok": row.ok} for row in rows]}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

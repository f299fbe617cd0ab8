"""What llama.cpp's RPC backend costs per token over loopback: `--cli` alone, and with every layer
on two `--rpc-worker` processes on 127.0.0.1, in the same run.

    python bench/rpc.py [--reps 5] [-n 128] [--model PATH]

Three programs, alternating run by run so that a change in the machine's load hits all alike:
  local             gemma-chat --cli (repacked weights where this CPU has such kernels)
  local --no-repack the same kernels as the workers run (RPC buffers are plain CPU buffers)
  --rpc 2 workers   gemma-chat --rpc A,B -ngl 999 --cli: layers 0-9 on one worker, the rest and
                    the output layer on the other; the token embeddings stay here, as in llama.cpp

Each side runs twice: with OpenMP as it comes (its threads spin a while after each parallel
region) and with OMP_WAIT_POLICY=passive (they sleep). On a shared 2-core machine the spinning
threads of three processes (the client and two workers, on one machine only here) take the CPU
from the one that has work, and that, not the network, dominated the first runs: the passive
rows are the cost of RPC itself; the others, what a user running workers beside the client sees.

Generation speed is the tokens after the first over the time from the first byte of the reply to
the last (a streamed `--cli` prints each token as it comes), so sampling, our Python and every
round trip to the workers count; model load and the upload of the weights to the workers do not
(their time is the whole process's, reported apart). Every worker and client gets -t 2: on this
2-core machine the worker and the client wait on each other, each token crossing the loopback
twice per worker.

Writes bench/results/rpc.md and rpc.json, with the CPU and the load average beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gemmachat.model_path import default_model  # noqa: E402

RESULTS = REPO / "bench" / "results"
PROMPT = "Once upon a time"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_worker(threads: int, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "gemmachat", "--rpc-worker", "--port", str(port), "-t", str(threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env=env)
    deadline = time.monotonic() + 120  # the first one may build the RPC backend
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"bench/rpc.py: the worker exited with {worker.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return worker, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    worker.kill()
    raise SystemExit("bench/rpc.py: a worker did not start listening")


def one_run(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """A streamed --cli run: tokens/s after the first token, and the whole process's wall time."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "gemmachat", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env=env)
    assert proc.stdout is not None
    first = last = None
    pieces = 0
    while chunk := os.read(proc.stdout.fileno(), 4096):
        now = time.monotonic()
        first = first or now
        last = now
        pieces += 1
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0 or first is None or last is None:
        raise SystemExit(f"bench/rpc.py: {' '.join(args)} failed ({proc.returncode}): {err.strip()}")
    return {"first_byte_s": first - started, "stream_s": last - first, "process_s": time.monotonic() - started}


def measure(common: list[str], env: dict[str, str], reps: int, n: int):
    """The three sides, alternating, each `reps` times: their medians and every sample."""
    workers = [start_worker(2, env) for _ in range(2)]
    endpoints = ",".join(endpoint for _, endpoint in workers)
    sides = {
        "local": common,
        "local --no-repack": [*common, "--no-repack"],
        "--rpc 2 workers": [*common, "--rpc", endpoints, "-ngl", "999"],
    }
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    try:
        one_run(sides["--rpc 2 workers"], env)  # warm-up: page cache, and the first connection
        names = list(sides)
        for rep in range(reps):
            order = names[rep % len(names):] + names[:rep % len(names)]  # each side goes first in turn
            for name in order:
                samples[name].append(one_run(sides[name], env))
    finally:
        for worker, _ in workers:
            worker.terminate()
            worker.wait()
    rows = {}
    for name, runs in samples.items():
        tps = statistics.median((n - 1) / run["stream_s"] for run in runs)
        rows[name] = {"tokens_per_s": round(tps, 1), "ms_per_token": round(1000 / tps, 2),
                      "process_s": round(statistics.median(run["process_s"] for run in runs), 2),
                      "first_byte_s": round(statistics.median(run["first_byte_s"] for run in runs), 2)}
    return rows, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("-n", type=int, default=128, help="tokens per run")
    parser.add_argument("--model", type=Path)
    opts = parser.parse_args(argv)
    model = opts.model or default_model(dict(os.environ))
    common = ["-m", str(model), "--cli", "-p", PROMPT, "-n", str(opts.n), "--ignore-eos", "--temp", "0", "-t", "2"]
    load_before = [round(x, 2) for x in os.getloadavg()]
    policies = {"OpenMP default": {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"},
                "OMP_WAIT_POLICY=passive": {**os.environ, "OMP_WAIT_POLICY": "passive"}}
    rows: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    for policy, env in policies.items():
        rows[policy], samples[policy] = measure(common, env, opts.reps, opts.n)
    load_after = [round(x, 2) for x in os.getloadavg()]
    extra = {policy: round(rows[policy]["--rpc 2 workers"]["ms_per_token"]
                           - rows[policy]["local --no-repack"]["ms_per_token"], 2) for policy in policies}
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cores": len(os.sched_getaffinity(0)), "load_average_before": load_before,
            "load_average_after": load_after, "model": model.name, "tokens": opts.n, "reps": opts.reps,
            "rpc_ms_per_token_over_no_repack": extra}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rpc.json").write_text(json.dumps({"meta": meta, "rows": rows, "samples": samples}, indent=2) + "\n")
    lines = [
        "# llama.cpp RPC over loopback: the cost per token",
        "",
        f"{meta['date']}, {meta['cpu']}, {meta['cores']} cores, shared with other jobs, load average "
        f"{load_before[0]} before and {load_after[0]} at the end; {model.name}, {opts.n} tokens "
        f"(`--ignore-eos --temp 0 -t 2`), median of {opts.reps} runs each, alternating.",
        "",
        "| run, OpenMP threads | tokens/s | ms/token | to the first byte | whole process |",
        "| --- | --- | --- | --- | --- |",
    ]
    for policy, table in rows.items():
        for name, row in table.items():
            lines.append(f"| {name}, {policy} | {row['tokens_per_s']} | {row['ms_per_token']} | "
                         f"{row['first_byte_s']} s | {row['process_s']} s |")
    lines += [""] + [f"With {policy}, each token through two workers on 127.0.0.1 costs {cost:+.2f} ms over the "
                     "same kernels run here (`local --no-repack`)." for policy, cost in extra.items()]
    lines += ["Command: `python bench/rpc.py` (see its docstring).", ""]
    (RESULTS / "rpc.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

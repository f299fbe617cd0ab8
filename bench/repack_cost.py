"""What --no-repack costs on this CPU, against the other way around llama.cpp's AMX crash.

On a CPU with AMX, gemma-chat keeps the weights in plain buffers (gemmachat/cpu.py). The other fix
would be a llama.cpp built without AMX kernels, which keeps the repacked AVX-512 kernels. Both
run here from the portable build (packaging/llama_build.py, from its cache): with its CPU
variants as they are (the sapphirerapids kernels, AMX compiled in, so no repacking) and with the
AMX variant left out (llama.cpp then picks the best AVX-512 variant without AMX, and gemma-chat
repacks), each also with --no-repack. pip's own -march=native build runs as a fourth row.
Each run is `--cli --verbose` on a ~1,500-token prompt and 129 generated tokens; llama.cpp's own
timers give prompt and generation speed. Configurations alternate, run by run; medians.

Usage:
    python bench/repack_cost.py [--runs 5]
Writes bench/results/repack_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import native  # noqa: E402
from bench.gpu_pack import llama_build  # noqa: E402
from gemmachat.cpu import cpu_flags  # noqa: E402

DECODE_TIMES = re.compile(r"llama\.cpp decode times: prompt eval ([\d.]+) ms / (\d+) tokens, eval ([\d.]+) ms / (\d+) runs")
VARIANT = re.compile(r"libggml-cpu-(\w+)\.so")
AMX_VARIANTS = ("sapphirerapids",)  # the variants ggml compiles with AMX_INT8 (ggml-cpu/CMakeLists.txt)


def portable_llama(folder: Path, without: tuple[str, ...]) -> Path:
    """The portable wheel's llama_cpp package in `folder`, less the CPU variants named."""
    builder = llama_build()
    wheel = builder.cached_wheel(cuda=False)
    if wheel is None:
        raise SystemExit("repack_cost: no portable build in the cache; run packaging/llama_build.py first")
    builder.unpack_llama_cpp(wheel, folder)
    for name in without:
        (folder / "llama_cpp" / "lib" / f"libggml-cpu-{name}.so").unlink(missing_ok=True)
    return folder


def run(python_path: str | None, prompt: Path, no_repack: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMMA_CHAT_", "LD_PRELOAD"))}
    env["LD_PRELOAD"] = str(native.aligned_malloc_library())  # bench/README.md says why
    if python_path:
        env["PYTHONPATH"] = f"{python_path}{os.pathsep}{REPO}"
    command = [sys.executable, "-m", "gemmachat", "--cli", "-f", str(prompt), "-n", "129", "--temp", "0",
               "--ignore-eos", "-c", "4096", "--verbose", *(["--no-repack"] if no_repack else [])]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    found = DECODE_TIMES.search(result.stderr)
    if result.returncode != 0 or not found:
        raise SystemExit(f"repack_cost: {' '.join(command)} failed ({result.returncode}): {result.stderr[-800:]}")
    prompt_ms, prompt_tokens, eval_ms, runs = float(found[1]), int(found[2]), float(found[3]), int(found[4])
    variant = VARIANT.search(result.stderr)
    return {"prompt_tps": prompt_tokens / prompt_ms * 1000, "gen_tps": runs / eval_ms * 1000,
            "variant": variant[1] if variant else "pip's -march=native build",
            "repacked": "weights stay in plain CPU buffers" not in result.stderr}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="repack-cost-"))
    try:
        words = "the river sea mountain city light road house garden morning evening bread water stone".split()
        prompt = work / "prompt.txt"
        prompt.write_text(" ".join(words[(i * 7) % len(words)] for i in range(1500)))
        with_amx = str(portable_llama(work / "with-amx", ()))
        without_amx = str(portable_llama(work / "without-amx", AMX_VARIANTS))
        configs = {
            "pip build, default (AMX CPU: no repacking)": (None, False),
            "portable, default": (with_amx, False),
            "portable without its AMX variant, default (repacking)": (without_amx, False),
            "portable without its AMX variant, --no-repack": (without_amx, True),
        }
        load_before = os.getloadavg()
        samples: dict[str, list[dict]] = {name: [] for name in configs}
        for round_ in range(args.runs):
            names = list(configs)
            names = names[round_ % len(names):] + names[:round_ % len(names)]  # each goes first in turn
            for name in names:
                python_path, no_repack = configs[name]
                samples[name].append(run(python_path, prompt, no_repack))
                print(f"[repack_cost] {name}: {samples[name][-1]}", file=sys.stderr)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, runs in samples.items():
        rows.append({"config": name, "variant": runs[0]["variant"], "repacked": runs[0]["repacked"],
                     "prompt_tps": round(statistics.median(r["prompt_tps"] for r in runs), 1),
                     "gen_tps": round(statistics.median(r["gen_tps"] for r in runs), 1)})
    flags = " ".join(flag for flag in ("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8") if flag in cpu_flags())
    header = (f"- date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; {os.cpu_count()} CPUs; "
              f"CPU flags: {flags}\n- load average before {[round(x, 2) for x in load_before]}, "
              f"after {[round(x, 2) for x in load_after]}\n- {args.runs} runs per row, alternating; medians; "
              "`--cli --verbose`, ~1,500-token prompt, 129 tokens generated, default threads, llama.cpp's timers\n")
    table = ["| configuration | CPU kernels | repacked | prompt tokens/s | generation tokens/s |",
             "| --- | --- | --- | --- | --- |"]
    table += [f"| {r['config']} | {r['variant']} | {'yes' if r['repacked'] else 'no'} | {r['prompt_tps']} | {r['gen_tps']} |"
              for r in rows]
    report = "# --no-repack on this CPU, against a build without AMX (bench/repack_cost.py)\n\n" + header + "\n" + "\n".join(table) + "\n"
    print(report)
    results = REPO / "bench" / "results"
    (results / "repack_cost.md").write_text(report)
    (results / "repack_cost.json").write_text(json.dumps({"rows": rows, "samples": samples,
                                                         "load": [load_before, load_after]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

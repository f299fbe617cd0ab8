"""Generation speed with a grammar against without, on one engine, in the same run.

Structured output (a JSON schema, "any JSON object", tool calls) runs llama.cpp's grammar sampler.
Gemma's vocabulary has 262,144 tokens: checked against the grammar at every step, they made
constrained generation 10-30 times slower than plain. The engine now does what llama.cpp's
common_sampler does (engine.py, _sample_with_grammar): the grammar checks the sampled token, and
the whole vocabulary only when it refuses it. Plain generation takes no grammar path at all.

Each round generates the same number of tokens plainly, with the "any JSON object" grammar, and
with a tool-call grammar, in rotation (the machine is shared and its load drifts); the figures
are medians of tokens per second over the decode, and each grammar's ratio to plain.

Usage:
    python bench/grammar.py [--rounds 5] [--tokens 64]
Writes bench/results/grammar.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gemmachat import llama_log  # noqa: E402
from gemmachat.engine import Engine, EngineOptions  # noqa: E402
from gemmachat.gguf import read_gguf  # noqa: E402
from gemmachat.model_path import default_model  # noqa: E402
from gemmachat.settings import Sampling  # noqa: E402
from gemmachat.structured import JSON_OBJECT_SCHEMA, grammar_for_schema  # noqa: E402
from gemmachat.templates import Segment, to_tokens  # noqa: E402
from gemmachat.tools import plan_for  # noqa: E402

PROMPT = "A weather report for Paris, as JSON:"
WEATHER_TOOL = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    llama_log.install(verbose=False)
    model = args.model or default_model(os.environ)
    load_before = os.getloadavg()
    grammars = {"plain": None, "json_object": grammar_for_schema(JSON_OBJECT_SCHEMA),
                "tool call": plan_for(WEATHER_TOOL, "required", None).grammar}
    speeds: dict[str, list[float]] = {name: [] for name in grammars}
    with Engine(model, read_gguf(model), EngineOptions(ctx_size=2048, threads=2)) as engine:
        prompt = to_tokens(engine, [Segment(PROMPT, False)])
        for round_number in range(args.rounds):
            for name, grammar in grammars.items():
                # ignore_eos: every run decodes the same number of tokens; a grammar that ends the
                # JSON early would otherwise time fewer.
                sampling = Sampling(temperature=1.0, seed=round_number, grammar=grammar)
                generation = engine.generate(engine.new_sequence(), prompt, sampling, max_tokens=args.tokens,
                                             ignore_eos=grammar is None)
                generation.text()
                stats = generation.stats
                speeds[name].append(stats.generated_tokens / stats.generation_seconds)
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": platform.processor() or _cpu_name(),
        "load_average_before": load_before,
        "load_average_at_end": os.getloadavg(),
        "rounds": args.rounds, "tokens": args.tokens,
        "tokens_per_second": speeds,
        "median_tokens_per_second": medians,
        "ratio_to_plain": {name: medians[name] / medians["plain"] for name in medians},
    }
    out = REPO / "bench" / "results"
    (out / "grammar.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {name} | {medians[name]:.1f} | {medians[name] / medians['plain']:.2f}x |" for name in medians)
    (out / "grammar.md").write_text(
        f"# Generation with a grammar against plain ({result['date']})\n\n"
        f"CPU: {result['cpu']}; load average {load_before[0]:.2f} before, {result['load_average_at_end'][0]:.2f} "
        f"at the end; {args.rounds} rounds of {args.tokens} tokens each, in rotation; medians.\n\n"
        "| generation | tokens/s | of plain |\n| --- | --- | --- |\n" + rows + "\n")
    print((out / "grammar.md").read_text())
    return 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())

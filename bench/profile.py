"""Profile gemma-chat's per-token path with pyinstrument: where the Python time goes.

Runs one greedy generation in this process (the same engine calls as `--cli`) under pyinstrument
and prints the call tree, then the share of wall time spent outside llama.cpp's decode and
sampling calls, which is the Python overhead a native program does not pay.

Usage:
    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/profile.py [-n 256] [--model PATH] [--threads 2] [--html out.html]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=256, help="tokens to generate (default 256)")
    parser.add_argument("--model", type=pathlib.Path, help="GGUF file (default: gemma-chat's default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--html", type=pathlib.Path, help="also write pyinstrument's HTML report here")
    args = parser.parse_args(argv)

    import llama_cpp
    from pyinstrument import Profiler

    from gemmachat import llama_log
    from gemmachat.engine import Engine, EngineOptions
    from gemmachat.gguf import read_gguf
    from gemmachat.model_path import default_model
    from gemmachat.settings import Sampling

    model = args.model or default_model(os.environ)
    llama_log.install(verbose=False)
    # Time spent inside the two C calls of each step, to separate llama.cpp's work from ours.
    in_c = [0.0]

    def timed(function):  # type: ignore[no-untyped-def]
        def wrapper(*a):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return function(*a)
            finally:
                in_c[0] += time.perf_counter() - started
        return wrapper

    with Engine(model, read_gguf(model), EngineOptions(ctx_size=8192, threads=args.threads)) as engine:
        prompt = engine.tokenize("Once upon a time, in a small village by the sea,", add_bos=True)
        greedy = Sampling(temperature=0.0)
        engine.generate(engine.new_sequence(), prompt, greedy, max_tokens=8).text()  # warm-up
        originals = {name: getattr(llama_cpp, name) for name in ("llama_decode", "llama_sampler_sample")}
        for name, function in originals.items():
            setattr(llama_cpp, name, timed(function))  # the engine looks them up on the module each call
        profiler = Profiler(interval=0.0005)
        started = time.perf_counter()
        with profiler:
            generation = engine.generate(engine.new_sequence(), prompt, greedy, max_tokens=args.n, ignore_eos=True)
            for _ in generation:
                pass
        wall = time.perf_counter() - started
        for name, function in originals.items():
            setattr(llama_cpp, name, function)
    print(profiler.output_text(unicode=True, color=False, show_all=False))
    if args.html:
        args.html.write_text(profiler.output_html(), encoding="utf-8")
    stats = generation.stats
    outside = wall - in_c[0]
    print(f"{stats.generated_tokens} tokens in {wall:.2f} s ({stats.generation_tokens_per_second:.1f} tokens/s); "
          f"llama_decode + llama_sampler_sample: {in_c[0]:.2f} s; everything else: {outside * 1000:.0f} ms "
          f"= {outside / wall:.2%} of the wall time, {outside / max(1, stats.generated_tokens) * 1e6:.0f} µs per token "
          "(the profiler's own sampling inflates it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

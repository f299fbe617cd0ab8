"""Resuming a long stored conversation: its saved KV cache restored, against evaluating it again.

A conversation of about 4,000 tokens (user paragraphs and the model's own replies, kept by the
chat's recorder, its KV cache saved as the chat saves it when leaving a conversation) is stored
twice: once with its saved cache, once without. Each run starts a fresh session on the engine,
resumes one of the two (as `/resume N` or `--resume` does) and asks the next question; what is
timed is from the resume to the first token of that reply. Runs alternate restored and
re-evaluated, because the machine is shared and its load drifts; the figures are medians. The
saved cache is read from the page cache after the first run, as on a machine that ran the chat
recently.

Usage:
    python bench/resume.py [--runs 5] [--tokens 4000]
Writes bench/results/resume.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gemmachat import llama_log  # noqa: E402
from gemmachat.engine import Engine, default_reply_limit, load_engine, renderer_for  # noqa: E402
from gemmachat.recorder import Recorder  # noqa: E402
from gemmachat.session import ChatSession  # noqa: E402
from gemmachat.settings import Settings, parse_settings  # noqa: E402
from gemmachat.store import Store  # noqa: E402
from gemmachat.templates import Template, load_template  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
TOPICS = ["the sea", "mountains", "bread", "the history of clocks", "bees", "rivers", "glass", "trains",
          "the moon", "paper", "salt", "bridges", "winter", "maps", "violins", "gardens"]
NEXT_QUESTION = "Now summarise everything we said in one sentence."


def paragraph(topic: str) -> str:
    """About 250 tokens of a user's message."""
    return (f"Tell me about {topic}. " + " ".join(
        f"I have been reading about {topic} for a while, and point {n} that keeps coming back is how "
        f"people lived with {topic} in every century, what they wrote about it, and why it mattered."
        for n in range(1, 6)))


@dataclass(frozen=True)
class Setup:
    settings: Settings
    engine: Engine
    template: Template


def build(setup: Setup, folder: Path, target_tokens: int) -> tuple[int, int, int]:
    """Store the long conversation (saving its cache as the chat does) and a copy without one;
    returns both ids and the tokens its cache holds."""
    settings = setup.settings
    session = new_session(setup)
    session.n_predict = 48
    recorder = Recorder.open(session, settings, print)
    topics = iter(TOPICS * 10)
    while session.context_used() < target_tokens:
        session.say(paragraph(next(topics)))
        recorder.sync()
        "".join(session.respond())
        recorder.sync()
    recorder.close()  # saves its cache, as leaving the chat (or /clear, /resume) does
    assert recorder.conversation_id is not None
    store = Store.open(folder, print)
    _, conversation = store.load(recorder.conversation_id)
    copy = store.create("copy without a saved cache", setup.engine.name, conversation.system, {})
    store.write(copy, 0, conversation.messages, conversation.system, "copy")
    store.close()
    return recorder.conversation_id, copy, len(session.sequence.tokens)


def new_session(setup: Setup) -> ChatSession:
    return ChatSession(setup.engine, renderer_for(setup.engine, setup.settings, setup.template),
                       setup.settings.sampling, n_predict=default_reply_limit(setup.engine, setup.settings.n_predict))


def time_resume(setup: Setup, conversation_id: int) -> dict[str, float | str]:
    """Seconds from resuming the conversation to the first token of the next reply."""
    session = new_session(setup)
    session.n_predict = 1
    recorder = Recorder.open(session, setup.settings, print)
    start = time.perf_counter()
    _, how = recorder.resume(str(conversation_id))
    resumed = time.perf_counter()
    session.say(NEXT_QUESTION)
    reply = session.respond()
    next(reply, None)
    first_token = time.perf_counter()
    reply.close()
    assert recorder.store is not None
    recorder.store.close()  # not recorder.close(): the saved cache must stay the one being measured
    stats = session.last_stats
    return {"first_token_s": first_token - start, "resume_s": resumed - start, "how": how,
            "evaluated_tokens": stats.evaluated_tokens if stats else -1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--tokens", type=int, default=4000, help="size of the conversation (default 4000)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    # The chat's own settings (context, threads, batch): only the data folder is the bench's.
    settings = parse_settings(["--chat", "--temp", "0"], {**os.environ, "GEMMA_CHAT_DATA_DIR": str(folder)})
    llama_log.install(verbose=False)
    load_before = os.getloadavg()
    try:
        with load_engine(settings) as engine:
            setup = Setup(settings, engine, load_template(settings.template))
            restored_id, copy_id, tokens = build(setup, folder, args.tokens)
            state_bytes = sum(path.stat().st_size for path in (folder / "kv").iterdir())
            samples: dict[str, list[dict[str, float | str]]] = {"restored": [], "re-evaluated": []}
            for run in range(args.runs):
                order = [("restored", restored_id), ("re-evaluated", copy_id)]
                for kind, number in order if run % 2 == 0 else reversed(order):
                    samples[kind].append(time_resume(setup, number))
                    print(f"run {run + 1} {kind}: {samples[kind][-1]['first_token_s']:.3f} s", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert all("restored its cache" in str(s["how"]) for s in samples["restored"]), samples["restored"]
    assert all("again" in str(s["how"]) for s in samples["re-evaluated"]), samples["re-evaluated"]
    medians = {kind: {key: statistics.median(float(s[key]) for s in runs)
                      for key in ("first_token_s", "resume_s", "evaluated_tokens")}
               for kind, runs in samples.items()}
    ratio = medians["restored"]["first_token_s"] / medians["re-evaluated"]["first_token_s"]
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, shared with other jobs",
        "load_average_before": load_before,
        "load_average_at_end": os.getloadavg(),
        "model": engine.name,
        "context": engine.n_ctx_seq,
        "conversation_tokens": tokens,
        "saved_cache_bytes": state_bytes,
        "runs": args.runs,
        "samples": samples,
        "medians": medians,
        "ratio_restored_to_re_evaluated": ratio,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "resume.json").write_text(json.dumps(result, indent=2) + "\n")
    restored, again = medians["restored"], medians["re-evaluated"]
    lines = [
        "# Resuming a stored conversation: saved KV cache against evaluating it again",
        "",
        f"{result['date']}, {result['machine']}, load average {load_before[0]:.1f} before and "
        f"{result['load_average_at_end'][0]:.1f} at the end; {engine.name}, context {engine.n_ctx_seq}; "
        f"a conversation of {tokens} tokens (saved cache {state_bytes / 1e6:.1f} MB); median of "
        f"{args.runs} runs each, alternating.",
        "",
        "| resume | to the first token of the next reply | of which the resume itself | prompt tokens evaluated |",
        "| --- | --- | --- | --- |",
        f"| saved cache restored | {restored['first_token_s']:.3f} s | {restored['resume_s']:.3f} s | "
        f"{restored['evaluated_tokens']:.0f} |",
        f"| evaluated again | {again['first_token_s']:.3f} s | {again['resume_s']:.3f} s | "
        f"{again['evaluated_tokens']:.0f} |",
        "",
        f"Restored / evaluated again: {ratio:.3f}x (target ≤ 0.2x).",
        "Command: `python bench/resume.py` (see its docstring).",
    ]
    (RESULTS_DIR / "resume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

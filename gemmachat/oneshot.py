"""`--cli`: one completion for scripts. Only the completion goes to stdout, streamed."""

from __future__ import annotations

import sys
from typing import Iterable

from gemmachat import fatal
from gemmachat.engine import Engine, load_engine, renderer_for
from gemmachat.errors import UserError, warn
from gemmachat.recorder import Recorder
from gemmachat.safe_io import read_file, read_stream
from gemmachat.session import ChatSession
from gemmachat.settings import Settings
from gemmachat.templates import Message, Segment, Template, load_template, to_tokens

# As much as the server takes in one request: more than any context holds.
PROMPT_LIMIT = 10 << 20


def read_prompt(settings: Settings) -> str:
    if settings.prompt is not None:
        return settings.prompt
    if settings.prompt_file is not None:
        # A stream is fine here: -f <(command), -f /dev/stdin.
        data = read_file(settings.prompt_file, PROMPT_LIMIT, "a prompt may be", streams=True, name="prompt file")
    else:
        data = read_stream(sys.stdin.buffer, PROMPT_LIMIT, "stdin", "a prompt may be")
    # Bytes that are not UTF-8 become U+FFFD rather than an error: a prompt is text to the model.
    return data.decode("utf-8", errors="replace")


def run(settings: Settings) -> int:
    template = load_template(settings.template)  # a bad --template is an error even unused
    prompt = read_prompt(settings)
    if not prompt:
        raise UserError("the prompt is empty: give one with -p, -f or on stdin")
    # One generation read by this thread: it decodes too, as llama-completion does (see EngineOptions).
    with load_engine(settings, inline=True) as engine:
        if settings.resume is not None or settings.save_to is not None:
            return _stored_turn(settings, engine, template, prompt)
        if settings.chat_turn:
            segments = renderer_for(engine, settings, template)(settings.system, [Message("user", prompt)], True)
        else:
            segments = [Segment(prompt, trusted=False)]
        tokens = to_tokens(engine, segments, special=settings.special, limit=engine.n_ctx_seq)
        # From the first token on, ctrl-c ends through KeyboardInterrupt: what was printed stays.
        fatal.interrupts_to_python()
        generation = engine.generate(
            engine.new_sequence(), tokens, settings.sampling, max_tokens=settings.n_predict,
            stop=settings.stop, ignore_eos=settings.ignore_eos,
        )
        _print(generation)
        if settings.verbose:
            stats = generation.stats
            print(
                f"gemma-chat: prompt {stats.prompt_tokens} tokens, "
                f"{stats.prompt_tokens_per_second:.1f} tokens/s; generated {stats.generated_tokens} "
                f"tokens, {stats.generation_tokens_per_second:.1f} tokens/s; {stats.finish_reason}",
                file=sys.stderr,
            )
            times = engine.decode_times()
            print(f"gemma-chat: llama.cpp decode times: prompt eval {times.prompt_ms:.2f} ms / "
                  f"{times.prompt_tokens} tokens, eval {times.eval_ms:.2f} ms / {times.eval_runs} runs, "
                  f"graphs reused {times.graphs_reused}",
                  file=sys.stderr)
    return 0


def _print(pieces: Iterable[str]) -> None:
    out = sys.stdout
    for piece in pieces:
        out.write(piece)
        out.flush()
    if out.isatty():
        out.write("\n")


def _stored_turn(settings: Settings, engine: Engine, template: Template, prompt: str) -> int:
    """--resume or --save-to: the prompt is the next user message of a stored conversation, and
    the exchange is kept in it (with its KV cache, so that the next call starts at once)."""
    session = ChatSession(engine, renderer_for(engine, settings, template), settings.sampling,
                          n_predict=settings.n_predict, special=settings.special)
    session.conversation.system = settings.system
    recorder = Recorder.open(session, settings, warn, required=True)
    try:
        if settings.resume is not None:
            _, how = recorder.resume(settings.resume)
            if settings.verbose:
                warn(how)
        else:
            assert settings.save_to is not None
            recorder.continue_titled(settings.save_to)
        session.say(prompt)
        recorder.sync()
        fatal.interrupts_to_python()
        _print(session.respond())
    finally:
        recorder.sync()
        recorder.close()
    return 0

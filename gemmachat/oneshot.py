"""`--cli`: one completion for scripts. Only the completion goes to stdout, streamed."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterable

from gemmachat import fatal
from gemmachat.errors import UserError, warn
from gemmachat.models import Model, open_model
from gemmachat.recorder import Recorder
from gemmachat.safe_io import read_file, read_stream
from gemmachat.session import Session
from gemmachat.settings import Settings
from gemmachat.templates import Template, load_template

# As much as the server takes in one request: more than any context holds.
PROMPT_LIMIT = 10 << 20


def read_prompt(settings: Settings) -> str:
    if settings.prompt is not None:
        return settings.prompt
    if settings.prompt_file is not None and settings.prompt_file != "-":  # -f -: stdin, as below
        # A stream is fine here: -f <(command), -f /dev/stdin.
        data = read_file(Path(settings.prompt_file), PROMPT_LIMIT, "a prompt may be", streams=True, name="prompt file")
    else:
        if sys.stdin.isatty():  # else it looks hung: no prompt was given, and it waits for one
            warn("reading the prompt from the terminal; ctrl-d on a line of its own ends it (or give -p TEXT)")
        data = read_stream(sys.stdin.buffer, PROMPT_LIMIT, "stdin", "a prompt may be")
    # Bytes that are not UTF-8 become U+FFFD rather than an error: a prompt is text to the model.
    return data.decode("utf-8", errors="replace")


def run(settings: Settings) -> int:
    template = load_template(settings.template)  # a bad --template is an error even unused
    prompt = read_prompt(settings)
    if not prompt:
        raise UserError("the prompt is empty: give one with -p, -f or on stdin")
    # Locally, one generation read by this thread: it decodes too, as llama-completion does (see
    # EngineOptions).
    with open_model(settings, inline=True) as model:
        if settings.resume is not None or settings.save_to is not None:
            return _stored_turn(settings, model, template, prompt)
        generation = model.complete(prompt, settings, template)
        # From the first token on, ctrl-c ends through KeyboardInterrupt: what was printed stays.
        fatal.interrupts_to_python()
        _print(generation)
        if settings.verbose:
            stats = generation.stats
            if stats.counted:
                warn(f"prompt {stats.prompt_tokens} tokens, {stats.prompt_tokens_per_second:.1f} tokens/s; "
                     f"generated {stats.generated_tokens} tokens, {stats.generation_tokens_per_second:.1f} "
                     f"tokens/s; {stats.finish_reason}")
            else:
                warn(f"token counts unknown (the server reported no usage); {stats.finish_reason}")
            for line in model.details():
                warn(line)
    return 0


def _print(pieces: Iterable[str]) -> None:
    out = sys.stdout
    for piece in pieces:
        out.write(piece)
        out.flush()
    if out.isatty():
        out.write("\n")


def _stored_turn(settings: Settings, model: Model, template: Template, prompt: str) -> int:
    """--resume or --save-to: the prompt is the next user message of a stored conversation, and
    the exchange is kept in it (with its KV cache, so that the next call starts at once)."""
    session = model.chat_session(settings, template, settings.n_predict)
    session.conversation.system = settings.system
    recorder = Recorder.open(session, settings, warn, required=True)
    # Calls that continue a stored conversation at once take turns, each turn whole. Without that,
    # one read the conversation while another's message waited for its reply, and then went on
    # as a new conversation, leaving its own message unanswered in the first (the check for
    # another writer comes only at the write). One lock for all: --save-to and --resume may name
    # one conversation in different ways, or make it.
    with recorder.turn_lock(), contextlib.closing(recorder):
        _take_turn(settings, session, recorder, prompt)
    return 0


def _take_turn(settings: Settings, session: Session, recorder: Recorder, prompt: str) -> None:
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

"""The chat: its session logic on the real engine, and piped use (the terminal: test_chat_terminal.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemmachat.conversation import Conversation
from gemmachat.engine import Engine, EngineOptions, PromptTooLong
from gemmachat.errors import UserError
from gemmachat.gguf import read_gguf
from gemmachat.output import Printer
from gemmachat.recorder import Recorder
from gemmachat.repl import Chat, fitted_meter
from gemmachat.session import ChatSession
from gemmachat.settings import DEFAULT_SYSTEM_PROMPT, Sampling
from gemmachat.templates import Message, load_template, render

GREEDY = Sampling(temperature=0)


def gemma_renderer():
    template = load_template("gemma")
    return lambda system, messages, generation=True: render(template, system, messages, generation)


def test_each_turn_evaluates_only_the_new_tokens(engine: Engine) -> None:
    session = ChatSession(engine, gemma_renderer(), GREEDY, n_predict=12)
    session.conversation.system = "Be brief."
    session.say("Hello, who are you?")
    first = "".join(session.respond())
    assert first and session.last_stats.reused_tokens == 0
    for turn in range(2, 5):
        before = len(session.sequence.tokens)
        session.say(f"Question number {turn}?")
        "".join(session.respond())
        stats = session.last_stats
        # Everything the sequence held is reused; only the closing of the last reply and the new
        # user turn are evaluated.
        assert stats.reused_tokens == before, (turn, stats)
        assert stats.evaluated_tokens < 20
    assert [m.role for m in session.conversation.messages] == ["user", "assistant"] * 4


def test_twelve_turns_in_a_small_context_never_crash(model_path: Path) -> None:
    with Engine(model_path, read_gguf(model_path), EngineOptions(ctx_size=384)) as small:
        session = ChatSession(small, gemma_renderer(), GREEDY, n_predict=24)
        session.conversation.system = "You are a patient assistant."
        dropped: list[int] = []
        # The context fills up twice over: the oldest exchanges are dropped more than once.
        for turn in range(12):
            session.say(f"Turn {turn}: tell me one more fact about the sea, please.")
            "".join(session.respond(on_drop=lambda messages: dropped.append(len(messages))))
            assert session.context_used() <= session.context_size
        assert len(dropped) >= 2, "the oldest exchanges were dropped along the way, more than once"
        assert session.conversation.system == "You are a patient assistant."
        assert session.conversation.messages[-1].role == "assistant"
        with pytest.raises(PromptTooLong):
            session.say("word " * 2000)
            "".join(session.respond())
        assert session.conversation.messages[-1].role == "assistant", "the refused message is not kept"


def test_interrupted_reply_is_kept_and_marked(engine: Engine) -> None:
    session = ChatSession(engine, gemma_renderer(), GREEDY, n_predict=200)
    session.say("Count to a hundred.")
    count = 0

    def cancelled() -> bool:
        return count >= 5

    for _ in session.respond(cancelled):
        count += 1
    last = session.conversation.messages[-1]
    assert last.role == "assistant" and last.interrupted and last.content


def test_a_reply_stopped_before_its_first_token_shows_no_speed(engine: Engine, tmp_path: Path) -> None:
    # The toolbar said "last reply: 0.0 tokens/s" after a ctrl-c that came while the prompt was read.
    session = ChatSession(engine, gemma_renderer(), GREEDY, n_predict=20)
    session.say("Hello")
    assert list(session.respond(lambda: True)) == []
    chat = Chat(session=session, printer=Printer(plain=True), template_description="", meter="",
                recorder=Recorder(None, None, tmp_path, print, "off"))  # type: ignore[arg-type]
    chat.update_meter()
    assert chat.meter is not None and chat.meter.endswith("last reply: stopped before its first token "), chat.meter


def test_save_and_load_round_trip_and_bad_files(tmp_path: Path) -> None:
    conversation = Conversation("sys", [Message("user", "hi 😀"), Message("assistant", "yo", interrupted=True)])
    path = tmp_path / "chat.json"
    conversation.save(path)
    loaded = Conversation.load(path)
    assert loaded.system == "sys" and loaded.messages == [Message("user", "hi 😀"),
                                                           Message("assistant", "yo", interrupted=True)]
    assert json.loads(path.read_text())["version"] == 1
    for bad in ("{not json", json.dumps({"format": "other"}), json.dumps(
            {"format": "gemma-chat conversation", "version": 1, "messages": [{"role": "wizard", "content": "x"}]}),
            json.dumps({"format": "gemma-chat conversation", "version": 99, "messages": []})):
        path.write_text(bad)
        with pytest.raises(UserError, match="cannot load"):
            Conversation.load(path)


def run_chat(run_cli, lines: str, *args: str):
    return run_cli("--chat", "-n", "8", *args, input=lines)


def test_piped_chat_is_scriptable(run_cli, tmp_path: Path) -> None:
    saved = tmp_path / "saved.json"
    result = run_chat(run_cli, f"Hello there\n/context\n/save {saved}\n/undo\n/bogus\nWhat next?\n")
    assert result.returncode == 1, result.stderr  # /bogus was refused; the lines after it still ran
    assert "\x1b[" not in result.stdout
    assert "context: " in result.stdout and "tokens used" in result.stdout
    assert "dropped 2 message(s)" in result.stdout
    # Refusals go to stderr, as `gemma-chat: ...` lines: the replies on stdout hold none of them.
    assert result.stderr == "gemma-chat: unknown command /bogus; /help lists the commands\n", result.stderr
    document = json.loads(saved.read_text())
    assert [m["role"] for m in document["messages"]] == ["user", "assistant"]
    assert document["messages"][0]["content"] == "Hello there"
    loaded = run_chat(run_cli, f"/load {saved}\n/dump\n")
    assert "<start_of_turn>user" in loaded.stdout and "Hello there" in loaded.stdout


def test_load_of_a_bad_file_keeps_the_conversation(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{]")
    result = run_chat(run_cli, f"Hi\n/load {bad}\n/context\n/dump\n")
    assert "cannot load" in result.stderr and "cannot load" not in result.stdout
    assert result.stdout.count("<start_of_turn>user\n") == 1 and "Hi" in result.stdout


def test_a_base_model_gets_no_default_system_prompt(run_cli) -> None:
    # The default model is a base model: it would only continue (echo) a system prompt.
    result = run_chat(run_cli, "/show system\nHi\n/dump\n")
    assert result.returncode == 0, result.stderr
    assert "(no system prompt)" in result.stdout
    assert DEFAULT_SYSTEM_PROMPT not in result.stdout and "helpful" not in result.stdout
    assert result.stdout.count("<start_of_turn>") == 2  # the user's turn and the reply, nothing before
    given = run_chat(run_cli, "/show system\nHi\n/dump\n", "-p", "Answer in French.")
    assert given.stdout.count("Answer in French.") == 2


def test_help_shows_the_default_system_prompt(run_cli) -> None:
    help_text = " ".join(run_cli("--help").stdout.split())
    assert DEFAULT_SYSTEM_PROMPT in help_text and "none for a base model" in help_text


def test_the_toolbar_fits_a_narrow_terminal() -> None:
    # At 40 columns prompt_toolkit cut it at the edge: " context: 21/8192 tokens · last reply: 4".
    meter = " context: 21/8192 tokens · last reply: 49.8 tokens/s "
    assert fitted_meter(meter, 80) == meter
    assert fitted_meter(meter, 40) == " 21/8192 tokens · 49.8 tokens/s "
    assert fitted_meter(meter, 20) == " 21/8192 tokens "

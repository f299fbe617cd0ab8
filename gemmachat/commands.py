"""The chat's slash commands: llamafile's set, plus what Ollama and llm users expect.

Each command is a function taking the chat and the text after the command name, registered with
its usage and help. `/help COMMAND` shows that help; an unknown command suggests the closest.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from gemmachat.conversation import Conversation
from gemmachat.errors import PromptTooLong, UserError
from gemmachat.safe_io import read_file, write_file
from gemmachat.structured import JSON_OBJECT_SCHEMA, grammar_for_schema

if TYPE_CHECKING:
    from gemmachat.repl import Chat

UPLOAD_LIMIT_BYTES = 1 << 20
MESSAGE_LIMIT = 10 << 20  # /edit's file: a message longer than any context is refused anyway


class ExitChat(Exception):
    """Raised by /exit: leave the chat with status 0."""


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    summary: str
    details: str
    run: Callable[[Chat, str], None]
    aliases: tuple[str, ...] = ()
    takes_path: bool = False


COMMANDS: dict[str, Command] = {}


def command(name: str, usage: str, summary: str, details: str = "", aliases: tuple[str, ...] = (),
            takes_path: bool = False) -> Callable[[Callable[[Chat, str], None]], Callable[[Chat, str], None]]:
    def register(function: Callable[[Chat, str], None]) -> Callable[[Chat, str], None]:
        entry = Command(name, usage, summary, details, function, aliases, takes_path)
        for key in (name, *aliases):
            COMMANDS[key] = entry
        return function

    return register


def find(name: str) -> Command:
    if name in COMMANDS:
        return COMMANDS[name]
    close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
    hint = f"; did you mean /{close[0]}?" if close else "; /help lists the commands"
    raise UserError(f"unknown command /{name}{hint}")


def dispatch(chat: Chat, line: str) -> None:
    name, _, argument = line[1:].partition(" ")
    entry = find(name.strip())
    if argument.strip() and " " not in entry.usage:
        # Refused, not ignored: "/clear all" or "/undo 3" did less than they seemed to ask.
        raise UserError(f"{entry.usage} takes no argument")
    entry.run(chat, argument.strip())


def unique_commands() -> list[Command]:
    return sorted({id(c): c for c in COMMANDS.values()}.values(), key=lambda c: c.name)


# -- help and leaving ------------------------------------------------------------------------------

@command("help", "/help [COMMAND]", "list the commands, or explain one", aliases=("?",))
def _help(chat: Chat, argument: str) -> None:
    if argument:
        entry = find(argument.lstrip("/"))
        names = ", ".join(f"/{n}" for n in (entry.name, *entry.aliases))
        chat.printer.text(f"{entry.usage}\n  {entry.summary}" + (f"\n  {entry.details}" if entry.details else "")
                          + (f"\n  also: {names}" if entry.aliases else ""))
        return
    chat.printer.rows([(c.usage, c.summary) for c in unique_commands()] + [
        ("", ""),
        ('"""', "start or end a multi-line message"),
        ("ctrl-j", "new line in a message"),
        ("ctrl-c", "stop the reply; on an empty prompt, leave"),
        ("ctrl-d", "leave"),
    ], 22)


@command("exit", "/exit", "leave the chat", aliases=("quit", "bye"))
def _exit(chat: Chat, argument: str) -> None:
    raise ExitChat()


# -- the conversation ------------------------------------------------------------------------------

@command("clear", "/clear", "start a new conversation (the system prompt stays)",
         "Checkpoints made with /push are dropped too. The one left stays stored: /history, /resume.")
def _clear(chat: Chat, argument: str) -> None:
    chat.recorder.start_new()
    chat.session.conversation.clear()
    chat.printer.info("conversation cleared")


@command("undo", "/undo", "drop the last exchange", "In manual mode, the last message.")
def _undo(chat: Chat, argument: str) -> None:
    dropped = chat.session.conversation.undo(one_message=chat.manual)
    chat.printer.info(f"dropped {len(dropped)} message(s)" if dropped else "nothing to undo")


@command("forget", "/forget", "drop the oldest message (the system prompt stays)")
def _forget(chat: Chat, argument: str) -> None:
    message = chat.session.conversation.forget()
    chat.printer.info(f"forgot the oldest {message.role} message" if message else "nothing to forget")


@command("push", "/push", "save a checkpoint of the conversation")
def _push(chat: Chat, argument: str) -> None:
    depth = chat.session.conversation.push()
    chat.printer.info(f"checkpoint {depth} saved")


@command("pop", "/pop", "go back to the last checkpoint")
def _pop(chat: Chat, argument: str) -> None:
    conversation = chat.session.conversation
    if conversation.pop():
        chat.printer.info(f"back to checkpoint {len(conversation.checkpoints) + 1} "
                          f"({len(conversation.messages)} messages)")
    else:
        chat.printer.info("no checkpoint to go back to (/push makes one)")


@command("stack", "/stack", "list the checkpoints")
def _stack(chat: Chat, argument: str) -> None:
    checkpoints = chat.session.conversation.checkpoints
    if not checkpoints:
        chat.printer.info("no checkpoints")
    for index, (_, messages) in enumerate(checkpoints, 1):
        last = next((m.content for m in reversed(messages) if m.role == "user"), "")
        chat.printer.text(f"  {index}: {len(messages)} messages  {last[:50]!r}")


@command("system", "/system [TEXT]", "show or replace the system prompt")
def _system(chat: Chat, argument: str) -> None:
    conversation = chat.session.conversation
    if argument:
        conversation.system = argument
        chat.printer.info("system prompt replaced")
    else:
        chat.printer.text(conversation.system or "(no system prompt)")


@command("retry", "/retry", "write the last reply again",
         "After a resumed conversation whose last message lost its reply, writes that reply.")
def _retry(chat: Chat, argument: str) -> None:
    messages = chat.session.conversation.messages
    if messages and messages[-1].role == "assistant":
        messages.pop()
    elif not messages or messages[-1].role != "user":
        raise UserError("there is no reply to retry")
    chat.respond()


@command("manual", "/manual [on|off]", "type messages as user, assistant or system",
         "In manual mode an empty line cycles the role; only user messages get a reply.")
def _manual(chat: Chat, argument: str) -> None:
    if argument not in ("", "on", "off"):
        raise UserError("usage: /manual [on|off]")
    chat.manual = (not chat.manual) if not argument else argument == "on"
    chat.role = "user"
    chat.printer.info(f"manual mode {'on: an empty line cycles the role' if chat.manual else 'off'}")


@command("edit", "/edit [N]", "change your message N and send it again, or write one in $EDITOR",
         "/edit N puts your Nth message of this conversation (counting from 1) in the prompt: what "
         "you send then replaces it, and everything after it (replies included) is dropped. An "
         "empty line or a command instead leaves the conversation as it was. /edit alone opens "
         "$VISUAL or $EDITOR to write the next message.")
def _edit(chat: Chat, argument: str) -> None:
    if argument:
        if not argument.isdecimal():  # `/edit -1` or `/edit 2 new text` went to the editor as text
            raise UserError("usage: /edit [N] (N: the number of one of your messages, from 1)")
        _edit_message(chat, int(argument))
        return
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # vi on a pipe wrote its screen into the script's output and read the script's lines as keys.
        raise UserError("/edit alone opens an editor, which needs a terminal: in a script, send the "
                        "message as a line")
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "message.md"
        path.touch()
        try:
            status = subprocess.call([*shlex.split(editor), str(path)])
        except OSError as error:
            raise UserError(f"cannot run the editor {editor!r}: {error.strerror}") from None
        text = read_file(path, MESSAGE_LIMIT, "a message may be").decode("utf-8", errors="replace")
    if status != 0 or not text.strip():
        chat.printer.info("nothing sent")
        return
    chat.send(text.rstrip("\n"))


def _edit_message(chat: Chat, number: int) -> None:
    messages = chat.session.conversation.messages
    mine = [index for index, message in enumerate(messages) if message.role == "user"]
    if not 1 <= number <= len(mine):
        raise UserError(f"there is no message {number}: this conversation has {len(mine)} of yours")
    chat.editing = mine[number - 1]
    chat.prefill = messages[chat.editing].content
    after = len(messages) - chat.editing - 1
    chat.printer.info(f"editing message {number}: sending replaces it and drops the {after} message(s) "
                      "after it; an empty line cancels")


# -- files -----------------------------------------------------------------------------------------

@command("upload", "/upload FILE", "share a text file with the model", takes_path=True)
def _upload(chat: Chat, argument: str) -> None:
    path = _path_argument(argument, "/upload FILE")
    data = read_file(path, UPLOAD_LIMIT_BYTES, "/upload takes text files")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if not text.strip() or "\x00" in text:
        raise UserError(f"{path} is not a text file (or it is empty)")
    content = f"{path.name}:\n```\n{text.rstrip()}\n```"
    size = chat.session.context_size
    try:
        needed = chat.session.count_tokens(content, None if size is None else size - 1)
    except PromptTooLong:
        raise UserError(f"{path} is {size} tokens or more; the context holds {size}") from None
    chat.session.say(content)
    chat.printer.info(f"uploaded {path.name} ({'unknown' if needed is None else needed} tokens)")


@command("save", "/save FILE", "save the conversation as JSON", "An existing FILE is replaced only if it "
         "is a conversation saved before; /dump FILE likewise replaces only an earlier dump.", takes_path=True)
def _save(chat: Chat, argument: str) -> None:
    path = _path_argument(argument, "/save FILE")
    chat.session.conversation.save(path)
    chat.printer.info(f"saved {len(chat.session.conversation.messages)} messages to {path}")


@command("load", "/load FILE", "load a conversation saved with /save", takes_path=True)
def _load(chat: Chat, argument: str) -> None:
    loaded = Conversation.load(_path_argument(argument, "/load FILE"))
    chat.recorder.start_new()  # kept as a new conversation; the one left stays stored
    chat.session.conversation = loaded
    chat.printer.info(f"loaded {len(loaded.messages)} messages")


@command("dump", "/dump [FILE]", "the raw prompt the model sees, special tokens included",
         takes_path=True)
def _dump(chat: Chat, argument: str) -> None:
    text = chat.session.dump()
    if argument:
        path = Path(argument).expanduser()
        # An earlier dump starts with the same special token (<bos>, or the template's first marker);
        # a dump that starts with plain text has no such mark, and replaces no file that has content.
        marker = text[:text.find(">") + 1].encode("utf-8") if text.startswith("<") and ">" in text else None
        write_file(path, text.encode("utf-8"), streams=True,  # /dump /dev/stdout, /dump FIFO
                   replaces=(lambda head: marker is not None and head.startswith(marker), "an earlier /dump"))
        chat.printer.info(f"wrote {len(text)} characters to {path}")
    else:
        chat.printer.text(text)


def _path_argument(argument: str, usage: str) -> Path:
    if not argument:
        raise UserError(f"usage: {usage}")
    return Path(argument).expanduser()


# -- numbers ---------------------------------------------------------------------------------------

@command("context", "/context", "how much of the context window is used")
def _context(chat: Chat, argument: str) -> None:
    total = chat.session.context_size
    try:
        used = chat.session.context_used()
    except PromptTooLong:
        chat.printer.text(f"context: the conversation is more than the {total} tokens it holds; the oldest "
                          "messages are dropped at the next reply")
        return
    if used is None or total is None:  # a server that does not say
        chat.printer.text(f"context: {'unknown' if used is None else used} tokens used, "
                          f"{'unknown' if total is None else total} total (the server did not say)")
        return
    width = 30
    filled = min(width, round(width * used / total))
    bar = "#" * filled + "." * (width - filled)
    chat.printer.text(f"context: {used} tokens used, {total - used} free, {total} total "
                      f"[{bar}] {100 * used / total:.0f}%")


@command("stats", "/stats", "speed of the last reply and of the session")
def _stats(chat: Chat, argument: str) -> None:
    last, totals = chat.session.last_stats, chat.session.totals
    if last is None:
        chat.printer.info("no reply yet")
        return
    prefill = totals.evaluated_tokens / totals.prompt_seconds if totals.prompt_seconds else 0.0
    generation = totals.generated_tokens / totals.generation_seconds if totals.generation_seconds else 0.0
    if not last.counted:  # a server that reported no usage
        chat.printer.text(f"last reply: token counts unknown (the server reported no usage); "
                          f"{last.prompt_seconds:.2f} s to the first piece, {last.generation_seconds:.2f} s after")
    else:
        reused = f"{last.reused_tokens} reused from the cache" if last.reuse_counted else "cache reuse unknown"
        chat.printer.text(
            f"last reply: prompt {last.evaluated_tokens} tokens evaluated ({reused}) "
            f"at {last.prompt_tokens_per_second:.1f} tokens/s; "
            f"{last.generated_tokens} tokens generated at {last.generation_tokens_per_second:.1f} tokens/s")
    chat.printer.text(
        f"session: {totals.replies} replies; prefill {totals.evaluated_tokens} tokens at "
        f"{prefill:.1f} tokens/s; generation {totals.generated_tokens} tokens at {generation:.1f} tokens/s"
    )


SETTABLE = {"temperature": "temperature", "temp": "temperature", "top_k": "top_k", "top_p": "top_p",
            "min_p": "min_p", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
            "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "seed": "seed"}


@command("set", "/set PARAM VALUE", "change a setting: temp, top_k, top_p, min_p, repeat_penalty, "
         "seed, n_predict, system",
         "Ollama's spellings work too: /set parameter temperature 0.7, /set system TEXT.")
def _set(chat: Chat, argument: str) -> None:
    words = argument.split(None, 1)
    if words and words[0] == "parameter":
        words = words[1].split(None, 1) if len(words) > 1 else []
    if len(words) != 2:
        raise UserError("usage: /set PARAM VALUE (/show settings lists them)")
    name, value = words[0].replace("-", "_").lower(), words[1]
    if name == "system":
        _system(chat, value)
        return
    if name == "format":  # as Ollama's /set format json: the replies are JSON, or follow a schema
        _set_format(chat, value)
        return
    try:
        if name in ("n_predict", "num_predict", "max_tokens"):
            chat.session.n_predict = int(value)
        elif name in SETTABLE:
            field = SETTABLE[name]
            kind = {f.name: f.type for f in fields(chat.session.sampling)}[field]
            number = int(value) if kind == "int" else float(value)
            if not math.isfinite(number) or (field == "repeat_penalty" and number <= 0):
                raise ValueError
            chat.session.sampling = replace(chat.session.sampling, **{field: number})
        else:
            raise UserError(f"unknown setting {name!r}; settable: {', '.join(sorted(SETTABLE))}, n_predict, "
                            "system, format")
    except ValueError:
        raise UserError(f"{value!r} is not a valid value for {name}") from None
    chat.printer.info(f"{name} = {value}")


def _set_format(chat: Chat, value: str) -> None:
    """`json` (any JSON object), a JSON schema, or `text` (no constraint)."""
    value = value.strip()
    if value == "text":
        grammar = None
    else:
        try:
            schema = JSON_OBJECT_SCHEMA if value == "json" else json.loads(value)
        except (ValueError, RecursionError):
            raise UserError("usage: /set format json|text|SCHEMA (a JSON schema on one line)") from None
        grammar = grammar_for_schema(schema)
    chat.session.sampling = replace(chat.session.sampling, grammar=grammar)
    chat.printer.info(f"format = {value if len(value) <= 60 else value[:57] + '...'}")


@command("show", "/show [WHAT]", "show the settings (WHAT: settings, model, system or template)")
def _show(chat: Chat, argument: str) -> None:
    what = argument or "settings"
    session = chat.session
    if what in ("settings", "parameters"):
        sampling = session.sampling
        rows = [(f.name, getattr(sampling, f.name)) for f in fields(sampling) if f.name not in ("logit_bias", "grammar")]
        rows.append(("n_predict", session.n_predict))
        rows.append(("format", "text" if sampling.grammar is None else "constrained by a grammar (/set format)"))
        chat.printer.rows(rows, 18)
    elif what in ("model", "info"):
        chat.printer.rows(session.about(), 18)
    elif what == "system":
        _system(chat, "")
    elif what == "template":
        chat.printer.text(chat.template_description)
    else:
        raise UserError("usage: /show [settings|model|system|template]")


# -- stored conversations --------------------------------------------------------------------------

@command("history", "/history [COUNT]", "the latest stored conversations (20 unless COUNT)",
         "Every conversation is kept as it happens (README, Where files go); --no-history turns "
         "that off. * marks this one.")
def _history(chat: Chat, argument: str) -> None:
    if argument and not (argument.isdecimal() and int(argument) > 0):
        raise UserError("usage: /history [COUNT] (COUNT: 1 or more)")
    summaries = chat.recorder.recent(int(argument or 20))
    if not summaries:
        chat.printer.info("no conversation is stored yet")
        return
    rows = [("*" if summary.id == chat.recorder.conversation_id else "", str(summary.id),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.updated)), str(summary.turns),
             summary.model, summary.title or "(untitled)") for summary in summaries]
    chat.printer.table(("", "id", "updated", "turns", "model", "title"), rows, right=(1, 3))


@command("resume", "/resume N|TITLE", "continue stored conversation N (or the latest whose title "
         "starts with TITLE)", "/history lists them. The one left stays stored.")
def _resume(chat: Chat, argument: str) -> None:
    if not argument:
        raise UserError("usage: /resume N|TITLE (/history lists them)")
    chat.resume(argument)


@command("rename", "/rename TITLE", "give this conversation a title",
         "Titles come from the first message otherwise; /resume TITLE finds it.")
def _rename(chat: Chat, argument: str) -> None:
    if not argument:
        raise UserError("usage: /rename TITLE")
    number = chat.recorder.rename(argument)
    chat.printer.info(f"conversation {number} is now {argument!r}")


@command("delete", "/delete N", "delete stored conversation N",
         "Deleting this conversation also starts a new one, as /clear.")
def _delete(chat: Chat, argument: str) -> None:
    if not argument.isdecimal():
        raise UserError("usage: /delete N (/history lists them)")
    if chat.recorder.delete(int(argument)):
        chat.session.conversation.clear()
        chat.printer.info(f"deleted conversation {argument}, this one: the chat starts afresh")
    else:
        chat.printer.info(f"deleted conversation {argument}")


# -- the clipboard ---------------------------------------------------------------------------------

@command("copy", "/copy [code]", "copy the last reply (or its last code block) to the clipboard",
         "Through the terminal (its OSC 52 sequence), so it works over SSH and in tmux with "
         "set-clipboard on; some terminals ask first or need it allowed in their settings.")
def _copy(chat: Chat, argument: str) -> None:
    if argument not in ("", "code"):
        raise UserError("usage: /copy [code]")
    reply = next((m.content for m in reversed(chat.session.conversation.messages) if m.role == "assistant"), None)
    if reply is None:
        raise UserError("there is no reply to copy")
    text, what = reply, "the last reply"
    if argument == "code":
        blocks = code_blocks(reply)
        if not blocks:
            raise UserError("the last reply has no code block")
        text, what = blocks[-1], "its last code block"
    if not chat.printer.stream.isatty():
        raise UserError("/copy needs a terminal: it goes through the terminal's clipboard sequence")
    chat.printer.to_clipboard(text)
    chat.printer.info(f"copied {what} ({len(text)} characters)")


def code_blocks(markdown: str) -> list[str]:
    """The fenced code blocks of a Markdown text, without their fences (an unclosed last one runs
    to the end, as in a reply cut short)."""
    blocks: list[str] = []
    fence: str | None = None
    lines: list[str] = []
    for line in markdown.split("\n"):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith(("```", "~~~")):
                fence, lines = stripped[:3], []
        elif stripped.startswith(fence) and not stripped.strip(fence[0]):
            blocks.append("\n".join(lines))
            fence = None
        else:
            lines.append(line)
    if fence is not None:
        blocks.append("\n".join(lines).rstrip("\n"))
    return blocks

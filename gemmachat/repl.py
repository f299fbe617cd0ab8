"""The interactive chat: the prompt_toolkit input loop, the banner, and the scripted (piped) loop.

Its start (the model, the server beside it) is gemmachat/chat.py.
"""

from __future__ import annotations

import datetime
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TextIO

try:
    import termios
except ImportError:  # Windows: its console keeps typed-ahead keys as typed
    termios = None  # type: ignore[assignment]

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings

from gemmachat import commands, fatal
from gemmachat.commands import ExitChat
from gemmachat.errors import PromptTooLong, UserError
from gemmachat.models import Model
from gemmachat.output import Printer
from gemmachat.recorder import Recorder
from gemmachat.safe_io import set_aside, write_file
from gemmachat.session import Session
from gemmachat.settings import Settings
from gemmachat.store import data_dir
from gemmachat.templates import Message, Template

ROLES = ("user", "assistant", "system")


def no_notices() -> str | None:
    return None


@dataclass
class Chat:
    session: Session
    printer: Printer
    template_description: str
    recorder: Recorder
    manual: bool = False
    role: str = "user"
    editing: int | None = None  # /edit N: the index of the message the next one replaces
    prefill: str = ""  # text the next prompt starts with
    meter: str | None = None  # the bottom toolbar's line, None when there is no toolbar
    # What happened behind the chat since its last turn (the background server failing to start).
    notices: Callable[[], str | None] = no_notices
    failures: int = 0  # lines refused with an error: the piped chat's exit status says whether any was

    def handle(self, line: str) -> None:
        """One line of input: a command or a message. User errors are shown, never fatal. Whatever
        it changed in the conversation is stored before the next prompt."""
        if notice := self.notices():
            self.printer.error(notice)
        editing, self.editing = self.editing, None  # an edit applies to the very next message only
        try:
            if line.startswith("/") and not line.startswith("//"):
                commands.dispatch(self, line)
            else:
                self.send(line[1:] if line.startswith("//") else line, editing)
        except UserError as error:
            self.failures += 1
            self.printer.error(str(error))
        finally:
            self.recorder.sync()
            self.update_meter()

    def send(self, text: str, replacing: int | None = None) -> None:
        role = self.role if self.manual else "user"
        self.session.say(text, role)
        if replacing is not None:
            # The edited message and everything after it give way to the new one.
            del self.session.conversation.messages[replacing:-1]
        if role == "user":
            self.respond()

    def respond(self) -> None:
        self.recorder.sync()  # the message is kept before its reply is written
        cancel = threading.Event()
        # ctrl-c during a reply stops it at the next token and keeps what was written; the
        # handler only sets a flag, so llama.cpp is never interrupted half-way through a step.
        previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
        try:
            self.printer.reply(self.session.respond(cancel.is_set, self._dropped))
        finally:
            signal.signal(signal.SIGINT, previous)
        stats = self.session.last_stats
        if stats and stats.finish_reason == "cancelled":
            self.printer.info("(reply interrupted; it stays in the conversation, /undo drops it)")

    def _dropped(self, messages: list[Message]) -> None:
        self.recorder.dropped(len(messages))
        self.printer.info(f"(context full: dropped the {len(messages)} oldest message(s); "
                          "the system prompt stays)")

    def resume(self, reference: str) -> None:
        """Continue a stored conversation: show it, then say how its next reply starts."""
        summary, how = self.recorder.resume(reference)
        self.printer.info(f"conversation {summary.id}: {summary.title or '(untitled)'} "
                          f"({summary.turns} turns, {summary.model})")
        conversation = self.session.conversation
        if conversation.system:
            self.printer.info(f"system: {conversation.system}")
        for message in conversation.messages:
            if message.role == "assistant":
                self.printer.reply([message.content])
            else:
                self.printer.text(f"{'>>>' if message.role == 'user' else 'system:'} {message.content}")
            if message.interrupted:
                self.printer.info("(interrupted)")
        self.printer.info(how)
        if conversation.messages and conversation.messages[-1].role == "user":
            self.printer.info("(its last message has no reply: /retry writes one)")

    def update_meter(self) -> None:
        """The toolbar's numbers: /context's count, and /stats' speed of the last reply."""
        if self.meter is None:
            return
        total = self.session.context_size
        try:
            used = "unknown" if (count := self.session.context_used()) is None else str(count)
        except PromptTooLong:  # a reply that filled the context: the next one drops the oldest messages
            used = f"over {total}"
        last = self.session.last_stats
        speed = ("none yet" if not last else "unknown speed" if not last.counted
                 else "stopped before its first token" if not last.generated_tokens  # not "0.0 tokens/s"
                 else f"{last.generation_tokens_per_second:.1f} tokens/s")
        self.meter = f" context: {used}/{'unknown' if total is None else total} tokens · last reply: {speed} "

    def cycle_role(self) -> None:
        self.role = ROLES[(ROLES.index(self.role) + 1) % len(ROLES)]
        self.printer.info(f"now typing as {self.role}")


@contextmanager
def typeahead_kept(stream: TextIO) -> Iterator[None]:
    """While a line is handled (a reply streams, a message or a conversation's cache is stored),
    keys typed ahead wait for the next prompt as they were typed.

    Between prompts the terminal is in cooked mode: it would echo the keys over the reply and turn
    Enter into ctrl-j, which the prompt takes as a line break, so a message typed ahead and sent
    with Enter would sit unsent in the next prompt. Held for the whole chat, not line by line: the
    prompt puts back the modes it found, so no moment between a prompt and its line is left in
    which an Enter still becomes ctrl-j.
    """
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (AttributeError, OSError, ValueError) + ((termios.error,) if termios else ()):
        yield
        return
    changed = list(saved)
    changed[0] &= ~termios.ICRNL  # input flags
    changed[3] &= ~termios.ECHO  # local flags
    termios.tcsetattr(fd, termios.TCSANOW, changed)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class ChatCompleter(Completer):
    """Tab completes command names, and file paths for the commands that take one."""

    def __init__(self) -> None:
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        name, space, argument = text[1:].partition(" ")
        if not space:
            for key in sorted(commands.COMMANDS):
                if key.startswith(name):
                    yield Completion("/" + key, start_position=-len(text))
            return
        entry = commands.COMMANDS.get(name)
        if entry and entry.takes_path:
            yield from self.paths.get_completions(Document(argument, len(argument)), complete_event)


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("c-j")
    def _(event) -> None:  # type: ignore[no-untyped-def]
        event.current_buffer.insert_text("\n")

    @bindings.add("c-c")
    def _(event) -> None:  # type: ignore[no-untyped-def]
        # With text typed, ctrl-c clears it; on an empty prompt it leaves, as llamafile.
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=EOFError())

    return bindings


class AtomicFileHistory(FileHistory):
    """prompt_toolkit's FileHistory appends in place, so a kill or a full disk mid-write leaves a
    torn entry; this one rewrites the (small) file atomically. A failed write keeps the entry in
    memory and is reported once, through `problem`, instead of ending the chat."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename)
        self.problem: str | None = None
        self._reported = False

    def store_string(self, string: str) -> None:
        path = Path(self.filename)
        entry = f"\n# {datetime.datetime.now()}\n" + "".join(f"+{line}\n" for line in string.split("\n"))
        try:
            old = path.read_bytes() if path.exists() else b""
            write_file(path, old + entry.encode("utf-8", errors="replace"))
        except (OSError, UserError) as error:
            if not self._reported:
                self.problem = f"input history not saved: {getattr(error, 'strerror', None) or error}"

    def take_problem(self) -> str | None:
        problem, self.problem = self.problem, None
        if problem:
            self._reported = True
        return problem


def input_history(environ: dict[str, str] | None = None) -> tuple[History, str | None]:
    """The persistent input history, or an in-memory one and a warning if it cannot be kept."""
    folder = data_dir(environ or {})
    path = folder / "history"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # what the user typed is private
        path.touch(mode=0o600)
        path.chmod(0o600)  # made 0644 before gemma-chat made it private
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        # A damaged history is set aside, not deleted and not fatal.
        try:
            aside = set_aside(path)
        except OSError as error:
            return InMemoryHistory(), f"input history not kept: it is damaged ({error.strerror})"
        return AtomicFileHistory(str(path)), f"the input history was damaged; moved it to {aside}"
    except OSError as error:
        return InMemoryHistory(), f"input history not kept: {error.strerror or error}"
    return AtomicFileHistory(str(path)), None


def fitted_meter(meter: str, width: int) -> str:
    """The toolbar's line for a terminal `width` columns wide: without its labels if it is too
    wide, then the context alone (prompt_toolkit cut it at the edge: "context: 21/8192 tokens · la")."""
    if len(meter) <= width:
        return meter
    short = meter.replace(" context: ", " ", 1).replace(" · last reply: ", " · ", 1)
    return short if len(short) <= width else short.split(" · ")[0] + " "


def read_message(prompt: Callable[[str], str], first: str) -> str | None:
    """Completes a `\"\"\"` block: lines up to the one that ends with `\"\"\"`. None if cancelled."""
    if not first.startswith('"""'):
        return first
    body = first[3:]
    if body.endswith('"""') and body:
        return body[:-3]
    lines = [body] if body else []
    while True:
        try:
            line = prompt("... ")
        except (EOFError, KeyboardInterrupt):
            return None
        if line.endswith('"""'):
            lines.append(line[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def interactive(chat: Chat, printer: Printer, environ: dict[str, str]) -> int:
    history, warning = input_history(environ)
    if warning:
        printer.info(warning)
    prompt_session: PromptSession[str] = PromptSession(
        history=history, completer=ChatCompleter(), key_bindings=_key_bindings(),
        complete_while_typing=False, enable_history_search=False,
        bottom_toolbar=(lambda: fitted_meter(chat.meter or "", get_app().output.get_size().columns))
        if chat.meter is not None else None,
    )
    # Start-up is over: ctrl-c now stops a reply, clears the input or leaves at an empty prompt.
    fatal.interrupts_to_python()
    with typeahead_kept(sys.stdin):
        return _prompt_loop(chat, printer, prompt_session, history)


def _prompt_loop(chat: Chat, printer: Printer, prompt_session: PromptSession[str],
                 history: History) -> int:
    while True:
        label = f"{chat.role} >>> " if chat.manual else ">>> "
        try:
            first = prompt_session.prompt(label, default=chat.prefill)
        except EOFError:
            return 0
        if isinstance(history, AtomicFileHistory) and (problem := history.take_problem()):
            printer.info(problem)
        chat.prefill = ""
        text = read_message(prompt_session.prompt, first)
        if text is None:
            continue
        if not text.strip():
            chat.editing = None  # an empty line cancels /edit N
            if chat.manual:
                chat.cycle_role()
            continue
        try:
            chat.handle(text)
        except ExitChat:
            return 0


def scripted(chat: Chat, lines: Iterable[str]) -> int:
    """Input that is not a terminal: each line is a message (or a command), each one tried; exit 1
    at the end if any was refused (its one line says why), else 0, so that a script can tell."""
    fatal.interrupts_to_python()  # start-up is over: ctrl-c stops a reply from here on
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            chat.handle(line)
        except ExitChat:
            break
    return 1 if chat.failures else 0


def system_prompt(settings: Settings, model: Model) -> str | None:
    if settings.prompt is not None:
        return settings.prompt
    if settings.prompt_file is not None:
        from gemmachat.oneshot import read_prompt

        if settings.prompt_file == "-":
            raise UserError("-f - reads stdin, where the chat reads its messages: give the system prompt "
                            "with -p or in a file")
        return read_prompt(settings)
    return model.default_system


def converse(model: Model, settings: Settings, template: Template, printer: Printer,
             server_line: str | None, stdin: TextIO, is_terminal: bool,
             notices: Callable[[], str | None] = no_notices) -> int:
    session = model.chat_session(settings, template, model.reply_limit(settings.n_predict))
    session.conversation.system = system_prompt(settings, model)
    recorder = Recorder.open(session, settings, printer.info)
    chat = Chat(session, printer, template_description=model.describe_template(template),
                recorder=recorder, meter="" if is_terminal and not printer.plain else None, notices=notices)
    try:
        if is_terminal and not settings.nologo:
            lines = [*model.banner(settings), *([server_line] if server_line else []),
                     "type /help for commands, ctrl-d or /exit to leave"]
            printer.info("\n".join(lines))
        if settings.resume is not None:
            try:
                chat.resume(settings.resume)
            except UserError as error:
                printer.error(str(error))
        chat.update_meter()
        if is_terminal:
            return interactive(chat, printer, dict(settings.environ))
        if server_line and not settings.nologo:
            print(f"gemma-chat: {server_line}", file=sys.stderr)
        lines = bounded_lines(stdin.buffer, commands.MESSAGE_LIMIT, printer) if hasattr(stdin, "buffer") else stdin
        return scripted(chat, lines)
    finally:
        recorder.close()


def bounded_lines(stream: BinaryIO, limit: int, printer: Printer) -> Iterator[str]:
    """Lines of piped input, decoded leniently so that one bad byte cannot end the session. A line
    of more than `limit` bytes (`cat /dev/zero | gemma-chat`) is skipped as it is read, never held
    whole, with one line saying so."""
    while line := stream.readline(limit + 1):
        if len(line) <= limit:
            yield line.decode("utf-8", errors="replace")
            continue
        while line and not line.endswith(b"\n"):
            line = stream.readline(limit + 1)
        printer.error(f"skipped a line of input longer than {limit // 1024} KiB")

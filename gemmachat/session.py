"""A chat session: one conversation on its own KV sequence, kept inside the context.

Each turn renders the whole conversation, but the engine reuses the tokens its sequence already
holds, and replies are replayed as the tokens that were generated: so turn N evaluates only what
is new since turn N-1. When the next turn would not fit, the oldest exchanges are dropped (never
the system prompt) and the caller is told.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from gemmachat import backends
from gemmachat.conversation import Conversation
from gemmachat.engine import Engine, Sequence, Stats
from gemmachat.errors import PromptTooLong, UserError
from gemmachat.settings import Sampling
from gemmachat.templates import Message, Renderer, Segment, prompt_text, to_tokens


@dataclass
class Totals:
    replies: int = 0
    evaluated_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0

    def add(self, stats: Stats) -> None:
        self.replies += 1
        if not stats.counted:  # a server that did not say: its speed stays out of the averages
            return
        self.evaluated_tokens += stats.evaluated_tokens
        self.reused_tokens += stats.reused_tokens
        self.generated_tokens += stats.generated_tokens
        self.prompt_seconds += stats.prompt_seconds
        self.generation_seconds += stats.generation_seconds


class Session(Protocol):
    """What the chat (gemmachat/repl.py, commands.py, recorder.py, oneshot.py) asks of a conversation
    with a model: ChatSession here on llama.cpp, RemoteSession (gemmachat/remote.py) over HTTP.
    Numbers a session cannot know are None, and the chat says "unknown"."""

    conversation: Conversation
    sampling: Sampling
    n_predict: int
    last_stats: Stats | None
    totals: Totals

    @property
    def model_name(self) -> str: ...

    @property
    def context_size(self) -> int | None: ...

    @property
    def kv(self) -> KVCache | None:
        """The model's cache of this conversation, which the store can save to resume it at once."""

    def context_used(self) -> int | None: ...

    def count_tokens(self, text: str, limit: int | None) -> int | None: ...

    def dump(self) -> str: ...

    def about(self) -> list[tuple[str, object]]: ...

    def say(self, text: str, role: str = "user") -> None: ...

    def respond(self, cancelled: Callable[[], bool] | None = None,
                on_drop: Callable[[list[Message]], None] | None = None) -> Iterator[str]: ...


@dataclass
class KVCache:
    """One conversation's slice of a local engine's KV cache."""

    engine: Engine
    sequence: Sequence

    @property
    def tokens(self) -> list[int]:
        return self.sequence.tokens

    def fingerprint(self) -> str:
        return self.engine.state_fingerprint()

    def state(self) -> tuple[list[int], bytes]:
        return self.engine.sequence_state(self.sequence)

    def restore(self, tokens: list[int], state: bytes) -> bool:
        return self.engine.restore_sequence(self.sequence, tokens, state)

    def forget(self) -> None:
        self.engine.new_sequence(self.sequence.seq_id)


def say(conversation: Conversation, text: str, role: str) -> None:
    if not text.strip():
        raise UserError("the message is empty")
    conversation.add(Message(role, text))


def record_reply(session: Session, text: str, stats: Stats, tokens: tuple[int, ...] = ()) -> None:
    """A reply, whole or interrupted, joins the conversation and the session's numbers."""
    interrupted = stats.finish_reason in ("cancelled", "")
    session.conversation.add(Message("assistant", text, tokens=tokens, interrupted=interrupted))
    session.last_stats = stats
    session.totals.add(stats)


@dataclass
class ChatSession:
    engine: Engine
    render: Renderer
    sampling: Sampling
    n_predict: int = -1
    special: bool = False
    seq_id: int = 0
    conversation: Conversation = field(default_factory=Conversation)
    last_stats: Stats | None = None
    totals: Totals = field(default_factory=Totals)

    def __post_init__(self) -> None:
        self.sequence = self.engine.new_sequence(self.seq_id)

    @property
    def model_name(self) -> str:
        return self.engine.name

    @property
    def kv(self) -> KVCache:
        return KVCache(self.engine, self.sequence)

    def count_tokens(self, text: str, limit: int | None) -> int:
        """Tokens of `text` as a message; PromptTooLong beyond `limit`."""
        return len(self.engine.tokenize(text, limit=limit))

    def about(self) -> list[tuple[str, object]]:
        """/show model's rows."""
        engine, info = self.engine, self.engine.info
        where = f"{engine.name}, inside {engine.path} from byte {info.start}" if info.start else engine.path
        return [("file", where), ("architecture", info.architecture), ("name", info.name),
                ("training context", engine.n_ctx_train), ("context", self.context_size),
                ("layers", engine.n_layer), ("chat template", "yes" if info.chat_template else "no (base model)"),
                ("threads", f"{engine.threads} now, of {engine.options.threads}"
                            + (" (fewer while other processes are busy)" if engine.options.adapt_threads else "")),
                ("weight repacking", "yes" if engine.repack.use_extra_buffers else f"no: {engine.repack.reason}"),
                ("CPU kernels", backends.cpu_variant() or "built for this machine's CPU")]

    # -- what the model sees ---------------------------------------------------------------------

    def segments(self, add_generation_prompt: bool = True) -> list[Segment]:
        return self.render(self.conversation.system, self.conversation.messages, add_generation_prompt)

    def tokens(self, add_generation_prompt: bool = True) -> list[int]:
        """The conversation's tokens; PromptTooLong if they are more than the context holds."""
        return to_tokens(self.engine, self.segments(add_generation_prompt), special=self.special,
                         limit=self.context_size)

    def dump(self) -> str:
        """The exact text of the conversation as the model sees it, special tokens spelled out."""
        bos = self.engine.token_text(self.engine.bos) if self.engine.add_bos else ""
        return bos + prompt_text(self.segments(add_generation_prompt=False))

    def context_used(self) -> int:
        return len(self.tokens(add_generation_prompt=False))

    @property
    def context_size(self) -> int:
        return self.engine.n_ctx_seq

    # -- turns -----------------------------------------------------------------------------------

    def reply_room(self) -> int:
        """Tokens kept free for the reply when fitting the conversation into the context."""
        wanted = self.n_predict if self.n_predict > 0 else 512
        return min(wanted, self.context_size // 4)

    def fit(self) -> tuple[list[int], list[Message]]:
        """The prompt tokens for the next reply, dropping the oldest exchanges until they fit.

        A last message that cannot fit even alone is refused (and removed) before anything
        older is dropped, so an oversized paste never costs the conversation.
        """
        messages = self.conversation.messages
        if messages:
            try:  # with room for one token of reply
                to_tokens(self.engine, self.render(self.conversation.system, messages[-1:], True),
                          special=self.special, limit=self.context_size - 1)
            except PromptTooLong:
                messages.pop()
                raise PromptTooLong(
                    f"that message needs {self.context_size} tokens or more with the system prompt, but "
                    f"the context holds {self.context_size} (start with a larger -c)"
                ) from None
        dropped: list[Message] = []
        while True:
            try:
                tokens: list[int] | None = self.tokens()
            except PromptTooLong:  # more than the whole context: certainly too long
                tokens = None
            if tokens is not None and (len(tokens) + self.reply_room() <= self.context_size or len(messages) <= 1):
                return tokens, dropped
            if len(messages) <= 1:  # the system prompt alone fills the context
                raise PromptTooLong(f"the system prompt is more than the {self.context_size} tokens the context "
                                    "holds (start with a larger -c)")
            dropped += self.conversation.drop_oldest_exchange()

    def respond(self, cancelled: Callable[[], bool] | None = None,
                on_drop: Callable[[list[Message]], None] | None = None) -> Iterator[str]:
        """Streams the model's reply to the conversation and adds it (interrupted or not)."""
        tokens, dropped = self.fit()
        if dropped and on_drop:
            on_drop(dropped)
        generation = self.engine.generate(self.sequence, tokens, self.sampling,
                                          max_tokens=self.n_predict, cancelled=cancelled)
        text = []
        try:
            for piece in generation:
                text.append(piece)
                yield piece
        finally:
            record_reply(self, "".join(text), generation.stats, tuple(generation.tokens))

    def say(self, text: str, role: str = "user") -> None:
        say(self.conversation, text, role)

"""Where replies come from: a model loaded here (llama.cpp), or a server elsewhere (--remote,
gemmachat/remote.py). The chat and --cli ask a Model for a Session and for completions, and never
which kind it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gemmachat import backends
from gemmachat.device import cpu_name, gpu_names
from gemmachat.engine import Engine, Generation, default_reply_limit, load_engine, renderer_for
from gemmachat.session import ChatSession, Session
from gemmachat.settings import DEFAULT_SYSTEM_PROMPT, Settings
from gemmachat.templates import Message, Segment, Template, to_tokens


class Model(Protocol):
    name: str
    # The chat's system prompt when -p and -f give none.
    default_system: str | None

    def reply_limit(self, n_predict: int) -> int:
        """The token limit of a chat reply, from -n."""

    def chat_session(self, settings: Settings, template: Template, n_predict: int) -> Session: ...

    def complete(self, prompt: str, settings: Settings, template: Template) -> Generation:
        """--cli: the completion of `prompt` (as one user turn with --chat-turn)."""

    def banner(self, settings: Settings) -> list[str]: ...

    def describe_template(self, template: Template) -> str:
        """/show template."""

    def details(self) -> list[str]:
        """--cli --verbose: what the model can say about the run, beyond its Stats."""

    def close(self) -> None: ...

    def __enter__(self) -> Model: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass
class LocalModel:
    """A GGUF loaded here into llama.cpp."""

    engine: Engine

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def default_system(self) -> str | None:
        # A base model (no chat template) only continues text, and would echo a system prompt.
        return DEFAULT_SYSTEM_PROMPT if self.engine.info.chat_template else None

    def reply_limit(self, n_predict: int) -> int:
        return default_reply_limit(self.engine, n_predict)

    def chat_session(self, settings: Settings, template: Template, n_predict: int) -> ChatSession:
        return ChatSession(self.engine, renderer_for(self.engine, settings, template), settings.sampling,
                           n_predict=n_predict, special=settings.special)

    def complete(self, prompt: str, settings: Settings, template: Template) -> Generation:
        engine = self.engine
        if settings.chat_turn:
            segments = renderer_for(engine, settings, template)(settings.system, [Message("user", prompt)], True)
        else:
            segments = [Segment(prompt, trusted=False)]
        tokens = to_tokens(engine, segments, special=settings.special, limit=engine.n_ctx_seq)
        return engine.generate(engine.new_sequence(), tokens, settings.sampling, max_tokens=settings.n_predict,
                               stop=settings.stop, ignore_eos=settings.ignore_eos)

    def banner(self, settings: Settings) -> list[str]:
        from gemmachat import __version__

        engine = self.engine
        gpus = gpu_names() if settings.n_gpu_layers > 0 else []
        if gpus:
            offloaded = min(settings.n_gpu_layers, engine.n_layer)
            device = f"{', '.join(gpus)} ({offloaded}/{engine.n_layer} layers offloaded)"
        else:
            threads = engine.options.threads
            count = f"up to {threads}" if engine.options.adapt_threads else str(threads)
            variant = backends.cpu_variant()  # in a build with kernels for every CPU: the ones chosen
            kernels = f", {variant} kernels" if variant else ""
            device = f"{cpu_name()} (CPU, {count} thread{'s' if threads > 1 else ''}{kernels})"
            if not engine.repack.use_extra_buffers:
                device += f"; no weight repacking: {engine.repack.reason}"
        kind = "" if engine.info.chat_template else (
            f" · base model (no chat template): replies capped at {self.reply_limit(settings.n_predict)} tokens")
        return [f"gemma-chat {__version__} · {engine.name}{kind}",
                f"device: {device} · context: {engine.n_ctx_seq} tokens"]

    def describe_template(self, template: Template) -> str:
        return f"{template.name}: {template.description}"

    def details(self) -> list[str]:
        times = self.engine.decode_times()
        return [f"llama.cpp decode times: prompt eval {times.prompt_ms:.2f} ms / {times.prompt_tokens} tokens, "
                f"eval {times.eval_ms:.2f} ms / {times.eval_runs} runs, graphs reused {times.graphs_reused}"]

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LocalModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(settings: Settings, *, inline: bool = False) -> Model:
    """The model the settings name: the server of --remote, else the GGUF loaded here (see
    load_engine; the chat loads its own, to share it with its server)."""
    if settings.remote is not None:
        from gemmachat import remote

        return remote.connect(settings)
    return LocalModel(load_engine(settings, inline=inline))

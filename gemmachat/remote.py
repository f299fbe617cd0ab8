"""--remote URL: the chat and --cli on an OpenAI-compatible server (llama-server, vLLM, Ollama,
another gemma-chat --server) instead of a model loaded here.

The server applies its own chat template, keeps its own cache and counts its own tokens: what it
reports (usage, llama.cpp's timings, /tokenize, /props) fills /stats and /context, and what it does
not is "unknown". Replies stream as server-sent events, read on a thread of their own so that
ctrl-c stops waiting at once, even while the server is still reading the prompt.

HTTP is httpx2, which huggingface_hub (for -hf) already brings: nothing new to install.
"""

from __future__ import annotations

import html
import json
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import httpx2

from gemmachat import __version__
from gemmachat.conversation import Conversation
from gemmachat.engine import Generation, Stats
from gemmachat.errors import PromptTooLong, UserError, one_line
from gemmachat.session import Totals, record_reply, say
from gemmachat.settings import Sampling, Settings
from gemmachat.templates import Message, Template, messages_of

# Seconds to wait for a TCP connection: a server that is there answers at once; the rest of
# --timeout is for its answers, which wait on the model.
CONNECT_TIMEOUT = 10.0
# How often a reply waiting for its next piece looks at ctrl-c.
CANCEL_POLL_SECONDS = 0.05
_NEUTRAL = Sampling()


@dataclass
class Server:
    """The server at the other end, and the client that talks to it."""

    url: str
    client: httpx2.Client
    timeout: float
    api_key_given: bool

    def failure(self, error: BaseException) -> UserError:
        """An HTTP client's error as the one line a user reads."""
        if isinstance(error, UserError):
            return error
        if isinstance(error, httpx2.ConnectTimeout):
            return UserError(f"cannot connect to {self.url}: no answer within {CONNECT_TIMEOUT:.0f} s")
        if isinstance(error, httpx2.ConnectError):
            return UserError(f"cannot connect to {self.url}: {_reason(error)}")
        if isinstance(error, httpx2.TimeoutException):
            return UserError(f"the server at {self.url} did not answer within {self.timeout:g} s (--timeout)")
        if isinstance(error, (httpx2.RemoteProtocolError, httpx2.ReadError)):
            # Mid-reply, events() says so itself; here no answer began (a port that is not HTTP's,
            # a server that crashed on the request).
            return UserError(f"the server at {self.url} closed the connection without answering ({_reason(error)})")
        if isinstance(error, httpx2.HTTPError):
            return UserError(f"the server at {self.url}: {_reason(error)}")
        if isinstance(error, ValueError):  # JSON that does not parse
            return UserError(f"the server at {self.url} sent what is not OpenAI's API: {one_line(str(error), 200)}")
        raise error

    def refusal(self, response: httpx2.Response, model: str | None) -> UserError:
        """An HTTP error status as one line, with the server's own message."""
        status, message = response.status_code, _error_message(response)
        if status in (401, 403):
            if not self.api_key_given:
                return UserError(f"the server at {self.url} wants an API key: give it with --api-key "
                                 f"(or $GEMMA_CHAT_API_KEY) ({status}: {message})")
            return UserError(f"the server at {self.url} refused the API key ({status}: {message})")
        if status == 404 and model and "model" in message.lower():
            return UserError(f"the server at {self.url} has no model {model!r} ({message}); -m NAME picks one")
        return UserError(f"the server at {self.url} answered {status}: {message}")

    def get(self, path: str) -> httpx2.Response:
        try:
            return self.client.get(path)
        except httpx2.HTTPError as error:
            raise self.failure(error) from None

    def post(self, path: str, body: dict[str, Any]) -> httpx2.Response:
        try:
            return self.client.post(path, json=body)
        except httpx2.HTTPError as error:
            raise self.failure(error) from None

    def events(self, path: str, body: dict[str, Any], model: str | None,
               cancelled: Callable[[], bool] | None) -> Iterator[dict[str, Any]]:
        """The JSON events of a streamed answer, until [DONE]; returns early once `cancelled`.

        A thread reads the stream: this one only waits for its events, so ctrl-c (a flag in the
        chat, KeyboardInterrupt in --cli) is seen at once. Once this generator is closed, the
        reader closes the connection at its next line, which tells the server to stop.
        """
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = threading.Event()

        def read() -> None:
            answering = False
            try:
                with self.client.stream("POST", path, json=body) as response:
                    answering = True
                    if response.status_code >= 400:
                        response.read()
                        events.put(("error", self.refusal(response, model)))
                        return
                    for line in response.iter_lines():
                        if stop.is_set():
                            return
                        if not line.startswith("data:"):
                            continue  # comments (pings), event names, blank separators
                        data = line[5:].strip()
                        if data == "[DONE]":
                            events.put(("done", None))
                            return
                        events.put(("event", json.loads(data)))
                raise httpx2.RemoteProtocolError("the stream ended before [DONE]")
            except (httpx2.RemoteProtocolError, httpx2.ReadError) as error:
                events.put(("error", UserError(f"the server at {self.url} closed the connection mid-reply "
                                               f"({_reason(error)})") if answering else error))
            except BaseException as error:  # noqa: BLE001 - handed to the reading thread, which raises it
                events.put(("error", error))

        threading.Thread(target=read, name="gemma-chat remote reply", daemon=True).start()
        try:
            while True:
                # Between pieces too: a server that streams fast never leaves the queue empty.
                if cancelled is not None and cancelled():
                    return
                try:
                    kind, value = events.get(timeout=CANCEL_POLL_SECONDS)
                except queue.Empty:
                    continue
                if kind == "done":
                    return
                if kind == "error":
                    raise self.failure(value)
                if isinstance(value, dict) and "error" in value:  # an error sent inside the stream
                    detail = value["error"]
                    raise UserError(f"the server at {self.url} stopped the reply: "
                                    f"{one_line(str(detail.get('message', detail) if isinstance(detail, dict) else detail), 300)}")
                yield value
        finally:
            stop.set()


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    # "[Errno 111] Connection refused" reads better without its number.
    return one_line(text.split("] ", 1)[-1] if text.startswith("[Errno") else text, 200)


_TITLE = re.compile(r"<title[^>]*>\s*(.*?)\s*</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def _error_message(response: httpx2.Response) -> str:
    """The message of OpenAI's error object, of Ollama's ({"error": "..."}), or FastAPI's."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        if "html" in response.headers.get("content-type", "") or text[:1] == "<":
            # A proxy's or a web server's page: its title, or its text, rather than its markup.
            title = _TITLE.search(text)
            text = html.unescape(title.group(1) if title else " ".join(_TAG.sub(" ", text).split()))
        return one_line(text or response.reason_phrase, 200)
    detail = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    if isinstance(detail, dict):
        detail = detail.get("message", detail)
    return one_line(str(detail), 300)


def sampling_fields(sampling: Sampling, max_tokens: int) -> dict[str, Any]:
    """The request's sampling: OpenAI's fields, and llama.cpp's (top_k, min_p, repeat_penalty,
    grammar) only where they differ from llama.cpp's defaults, which a llama.cpp server uses
    anyway and which OpenAI's own API would refuse as unknown."""
    body: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                            "max_tokens": max_tokens if max_tokens >= 0 else None}
    if sampling.seed != _NEUTRAL.seed:
        body["seed"] = sampling.seed
    for name in ("presence_penalty", "frequency_penalty", "top_k", "min_p", "repeat_penalty", "repeat_last_n"):
        if getattr(sampling, name) != getattr(_NEUTRAL, name):
            body[name] = getattr(sampling, name)
    if sampling.grammar is not None:
        body["grammar"] = sampling.grammar
    return body


def stream_generation(server: Server, path: str, body: dict[str, Any], model: str | None,
                      piece_of: Callable[[dict[str, Any]], str | None],
                      cancelled: Callable[[], bool] | None = None) -> Generation:
    """A streamed answer as a Generation: text pieces, and Stats from the server's usage (and
    llama.cpp's timings, where it sends them) or from the clock here."""
    stats = Stats(counted=False, reuse_counted=False)
    if body.get("max_tokens") == 0:  # -n 0: nothing to generate, and OpenAI's API refuses a 0
        stats.finish_reason = "length"
        return Generation(iter(()), stats, [])
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model

    def pieces() -> Iterator[str]:
        started = time.perf_counter()
        first = 0.0
        try:
            for event in server.events(path, body, model, cancelled):
                try:
                    for choice in event.get("choices") or ():
                        text = piece_of(choice)
                        if text is not None and not isinstance(text, str):
                            raise TypeError(f"a piece of text that is {type(text).__name__}")
                        if text:
                            if not first:
                                first = time.perf_counter()
                                stats.prompt_seconds = first - started
                            yield text
                        if choice.get("finish_reason"):
                            stats.finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
                    _count(stats, event)
                except (AttributeError, TypeError, ValueError) as error:  # JSON, but not of OpenAI's shapes
                    raise server.failure(ValueError(f"{type(error).__name__}: {error}")) from None
            if not stats.finish_reason and cancelled is not None and cancelled():
                stats.finish_reason = "cancelled"
        finally:
            if first and not stats.generation_seconds:
                stats.generation_seconds = time.perf_counter() - first

    return Generation(pieces(), stats, [])


def _count(stats: Stats, event: dict[str, Any]) -> None:
    usage = event.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        stats.generated_tokens = usage["completion_tokens"]
        stats.counted = True
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if isinstance(cached, int):
            stats.reused_tokens, stats.reuse_counted = cached, True
    timings = event.get("timings")  # llama-server's, in its last events
    if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
        stats.reused_tokens, stats.reuse_counted = timings["cache_n"], True
        stats.prompt_seconds = float(timings.get("prompt_ms") or 0) / 1000
        stats.generation_seconds = float(timings.get("predicted_ms") or 0) / 1000


def _delta(choice: dict[str, Any]) -> str | None:
    return (choice.get("delta") or {}).get("content")


def _text(choice: dict[str, Any]) -> str | None:
    return choice.get("text")


@dataclass
class RemoteSession:
    """A conversation whose replies the server writes (the Session of gemmachat/session.py)."""

    server: Server
    model: str | None
    sampling: Sampling
    n_predict: int = -1
    context_limit: int | None = None
    conversation: Conversation = field(default_factory=Conversation)
    last_stats: Stats | None = None
    totals: Totals = field(default_factory=Totals)
    kv: None = None  # the server keeps its cache; there is none here to save
    # The tokens the server counted in the conversation at its last reply, and how many messages
    # it had then: /context's number until the conversation changes.
    _counted: tuple[int, int] | None = None

    @property
    def model_name(self) -> str:
        return self.model or self.server.url

    @property
    def context_size(self) -> int | None:
        return self.context_limit

    def context_used(self) -> int | None:
        if self._counted is None or self._counted[0] != len(self.conversation.messages):
            return None
        return self._counted[1]

    def count_tokens(self, text: str, limit: int | None) -> int | None:
        """By the server's /tokenize (llama.cpp's and ours), where it has one."""
        try:
            response = self.server.post("/tokenize", {"content": text})
            tokens = response.json().get("tokens") if response.status_code == 200 else None
        except (UserError, ValueError, AttributeError):
            return None
        if not isinstance(tokens, list):
            return None
        if limit is not None and len(tokens) > limit:
            raise PromptTooLong(f"the text is {len(tokens)} tokens, more than the {limit} the context holds")
        return len(tokens)

    def dump(self) -> str:
        return ("(the server applies its own chat template to these messages; its prompt text is not "
                "seen here)\n" + json.dumps(messages_of(self.conversation.system, self.conversation.messages),
                                            ensure_ascii=False, indent=2))

    def about(self) -> list[tuple[str, object]]:
        return [("server", self.server.url), ("model", self.model or "(the server's default)"),
                ("context", self.context_limit or "unknown (the server does not say)"),
                ("chat template", "the server's own")]

    def say(self, text: str, role: str = "user") -> None:
        say(self.conversation, text, role)

    def respond(self, cancelled: Callable[[], bool] | None = None,
                on_drop: Callable[[list[Message]], None] | None = None) -> Iterator[str]:
        """Streams the server's reply to the conversation and adds it, interrupted or not (a
        server that dies mid-reply too: what came is kept, then its one-line error is raised)."""
        body = {"messages": messages_of(self.conversation.system, self.conversation.messages),
                **sampling_fields(self.sampling, self.n_predict)}
        generation = stream_generation(self.server, "/v1/chat/completions", body, self.model, _delta, cancelled)
        text: list[str] = []
        try:
            for piece in generation:
                text.append(piece)
                yield piece
        finally:
            stats = generation.stats
            # Refused before it began (a 400, a lost connection): no reply to keep, and the message
            # stays for /retry.
            if text or stats.finish_reason:
                record_reply(self, "".join(text), stats)
                if stats.counted:
                    self._counted = (len(self.conversation.messages), stats.prompt_tokens + stats.generated_tokens)


@dataclass
class RemoteModel:
    """The server as the chat and --cli see a model (the Model of gemmachat/models.py)."""

    server: Server
    model: str | None
    context_limit: int | None
    default_system: str | None = None  # the server's own defaults apply

    @property
    def name(self) -> str:
        return self.model or self.server.url

    def reply_limit(self, n_predict: int) -> int:
        return n_predict  # the server caps what it caps

    def chat_session(self, settings: Settings, template: Template, n_predict: int) -> RemoteSession:
        return RemoteSession(self.server, self.model, settings.sampling, n_predict, self.context_limit)

    def complete(self, prompt: str, settings: Settings, template: Template) -> Generation:
        body = sampling_fields(settings.sampling, settings.n_predict)
        if settings.stop:
            body["stop"] = list(settings.stop)
        if settings.ignore_eos:
            body["ignore_eos"] = True
        if settings.chat_turn:
            body["messages"] = messages_of(settings.system, [Message("user", prompt)])
            return stream_generation(self.server, "/v1/chat/completions", body, self.model, _delta)
        body["prompt"] = prompt
        return stream_generation(self.server, "/v1/completions", body, self.model, _text)

    def banner(self, settings: Settings) -> list[str]:
        context = f"{self.context_limit} tokens" if self.context_limit else "unknown"
        return [f"gemma-chat {__version__} · {self.name} at {self.server.url} (remote: no model loaded here)",
                f"context: {context} · the server applies its own chat template"]

    def describe_template(self, template: Template) -> str:
        return "the server's own chat template (--template and --jinja apply to models loaded here)"

    def details(self) -> list[str]:
        return [f"generated by {self.server.url}"]

    def close(self) -> None:
        self.server.client.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(settings: Settings) -> RemoteModel:
    """The server of --remote, checked: reachable, the API key taken, the model there. What it
    says of its context (llama.cpp's /props) is kept for /context."""
    assert settings.remote is not None
    headers = {"User-Agent": f"gemma-chat/{__version__}"}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    client = httpx2.Client(base_url=settings.remote, headers=headers, follow_redirects=True,
                           timeout=httpx2.Timeout(settings.timeout, connect=min(CONNECT_TIMEOUT, settings.timeout)))
    server = Server(settings.remote, client, settings.timeout, settings.api_key is not None)
    try:
        wanted = str(settings.model) if settings.model is not None else None
        response = server.get("/v1/models")
        if response.status_code == 404:
            listed: list[str] = []  # no list to check against: the first reply will tell
        elif response.status_code != 200:
            raise server.refusal(response, wanted)
        else:
            try:
                listed = [str(entry["id"]) for entry in response.json()["data"]]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{settings.remote} does not look like an OpenAI-compatible server "
                                "(its /v1/models is not a model list)") from None
        if wanted is not None and listed and wanted not in listed:
            raise UserError(f"the server at {settings.remote} has no model {wanted!r}; it has "
                            f"{', '.join(repr(name) for name in listed[:8])} (-m NAME picks one)")
        return RemoteModel(server, wanted or (listed[0] if listed else None), _context_size(server))
    except BaseException:
        client.close()
        raise


def _context_size(server: Server) -> int | None:
    """llama-server's /props names the context of a slot; other servers do not say."""
    try:
        response = server.get("/props")
        if response.status_code != 200:
            return None
        props = response.json()
        size = (props.get("default_generation_settings") or {}).get("n_ctx", props.get("n_ctx"))
    except (UserError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and size > 0 else None

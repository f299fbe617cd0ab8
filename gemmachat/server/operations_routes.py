"""What an operator and llama-server's clients ask of a running server: /metrics, /props, /slots.

Shaped as llama-server serves them, with its metric names, so that a Prometheus scrape config or
a dashboard written for llama-server works unchanged. Unlike llama-server, which needs `--metrics`
and `--slots` to serve these, they are always on: the counters cost a few additions per request,
and nothing here says more than /health and the usage of each reply already do (no prompt text,
no file path). Like every other endpoint but /health, they need the API key when one is set.
"""

from __future__ import annotations

import importlib.metadata
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from gemmachat import __version__

if TYPE_CHECKING:
    from gemmachat.engine import Stats
    # Only for annotations: core.py imports this module, for Metrics.
    from gemmachat.server.core import ServerCore

# Prometheus' text exposition format, as llama-server labels it.
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class _Rate:
    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Metrics:
    """Counters over the server's life, and throughput since the last scrape (llama-server's
    "bucket": its tokens/s gauges average over the window between two scrapes). Worker threads
    record; the event loop reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = int(time.time())
        self.requests = 0
        self.prompt = _Rate()  # prompt tokens evaluated, not those reused from the cache
        self.prompt_cached = 0
        self.predicted = _Rate()
        self.tokens_max = 0
        self.embedding_requests = 0
        self.embedded = _Rate()
        self._prompt_bucket = _Rate()
        self._predicted_bucket = _Rate()

    def record(self, stats: Stats) -> None:
        """A generation that ran (to its end, or cancelled part way)."""
        with self._lock:
            self.requests += 1
            for rate in (self.prompt, self._prompt_bucket):
                rate.add(stats.evaluated_tokens, stats.prompt_seconds)
            for rate in (self.predicted, self._predicted_bucket):
                rate.add(stats.generated_tokens, stats.generation_seconds)
            self.prompt_cached += stats.reused_tokens
            self.tokens_max = max(self.tokens_max, stats.prompt_tokens + stats.generated_tokens)

    def record_embedding(self, tokens: int, seconds: float) -> None:
        """An embeddings request that ran to its end (llama-server counts these nowhere)."""
        with self._lock:
            self.embedding_requests += 1
            self.embedded.add(tokens, seconds)

    def render(self, core: ServerCore) -> str:
        """The Prometheus text, and a new window for the throughput gauges."""
        engine = core.engine
        with self._lock:
            prompt_rate, predicted_rate = self._prompt_bucket.per_second(), self._predicted_bucket.per_second()
            self._prompt_bucket, self._predicted_bucket = _Rate(), _Rate()
            counters = [
                ("llamacpp:prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens",
                 self.prompt.tokens),
                ("llamacpp:prompt_tokens_cached_total", "Number of prompt tokens reused from the cache", self.prompt_cached),
                ("llamacpp:prompt_seconds_total", "Total time spent processing prompts", self.prompt.seconds),
                ("llamacpp:tokens_predicted_total", "Number of generation tokens processed", self.predicted.tokens),
                ("llamacpp:tokens_predicted_seconds_total", "Total time spent generating tokens", self.predicted.seconds),
                ("llamacpp:n_decode_total", "Total number of llama_decode() calls", engine.decodes),
                ("llamacpp:n_tokens_max", "Largest observed sequence length (prompt + generation)", self.tokens_max),
                ("gemmachat:requests_total", "Number of generation requests run (llama-server has no such counter)",
                 self.requests),
                ("gemmachat:embedding_requests_total", "Number of embedding requests run", self.embedding_requests),
                ("gemmachat:embedding_tokens_total", "Number of tokens embedded", self.embedded.tokens),
                ("gemmachat:embedding_seconds_total", "Total time spent computing embeddings", self.embedded.seconds),
            ]
        processing = core.health()["slots_processing"]
        gauges = [
            ("llamacpp:prompt_tokens_seconds", "Average prompt throughput in tokens/s", prompt_rate),
            ("llamacpp:predicted_tokens_seconds", "Average generation throughput in tokens/s", predicted_rate),
            ("llamacpp:requests_processing", "Number of requests processing", processing),
            ("llamacpp:requests_deferred", "Number of requests deferred", core.slots.waiting),
            ("llamacpp:n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call",
             engine.decoded_sequences / max(engine.decodes, 1)),
        ]
        lines = []
        for kind, items in (("counter", counters), ("gauge", gauges)):
            for name, help_text, value in items:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _llama_cpp_version() -> str:
    # gemmachat/bindings.py loads llama_cpp without its __init__ (so without __version__), and the
    # frozen single-file program has no package metadata: then the version is unknown.
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def props(core: ServerCore) -> dict[str, Any]:
    """llama-server's /props, with what gemma-chat has of it."""
    engine, sampling = core.engine, core.settings.sampling
    params = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "min_p": sampling.min_p, "repeat_penalty": sampling.repeat_penalty,
              "repeat_last_n": sampling.repeat_last_n, "presence_penalty": sampling.presence_penalty,
              "frequency_penalty": sampling.frequency_penalty, "seed": sampling.seed,
              "n_predict": core.default_max_tokens}
    return {
        "default_generation_settings": {"n_ctx": engine.n_ctx_seq, "params": params},
        "total_slots": core.slots.total,
        "model_alias": core.model_id,
        # The file's name, not llama-server's full path: the path names the user's directories
        # (and often the user), and a server on --host 0.0.0.0 would tell them to the network;
        # clients show this field, they never open it.
        "model_path": engine.name,
        "modalities": {"vision": False, "video": False, "audio": False},
        "endpoint_slots": True,
        "endpoint_props": False,
        "endpoint_metrics": True,
        # The GGUF's own template (llama-server's field); gemma-chat renders with it under --jinja,
        # else with its --template (a Gemma format; see templates/).
        "chat_template": engine.info.chat_template or "",
        "bos_token": engine.token_text(engine.bos),
        "eos_token": engine.token_text(engine.eos),
        "build_info": f"gemma-chat {__version__}, llama-cpp-python {_llama_cpp_version()}",
        "is_sleeping": False,
    }


def slots(core: ServerCore) -> list[dict[str, Any]]:
    """llama-server's /slots: each slot, what its KV cache holds, and its latest request's counts
    (never the prompt or the reply text, which llama-server includes: they are other clients')."""
    busy = core.busy_slots()
    answer = []
    for sequence in core.sequences:
        slot: dict[str, Any] = {"id": sequence.seq_id, "n_ctx": core.engine.n_ctx_seq, "speculative": False,
                                "is_processing": sequence.seq_id in busy, "n_tokens_cached": len(sequence.tokens)}
        job = core.last_jobs.get(sequence.seq_id)
        stats = job.stats if job is not None else None
        if job is not None and stats is not None:
            slot.update({
                "n_prompt_tokens": stats.prompt_tokens,
                "n_prompt_tokens_processed": stats.evaluated_tokens,
                "n_prompt_tokens_cache": stats.reused_tokens,
                "next_token": [{"has_next_token": sequence.seq_id in busy,
                                "n_remain": max(job.max_tokens - stats.generated_tokens, 0),
                                "n_decoded": stats.generated_tokens}],
            })
        answer.append(slot)
    return answer


def add_routes(app: FastAPI, core: ServerCore) -> None:
    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics, as llama-server's")
    async def metrics() -> Any:
        return PlainTextResponse(core.metrics.render(core), media_type=PROMETHEUS_TEXT,
                                 headers={"Process-Start-Time-Unix": str(core.metrics.started)})

    @app.get("/props", summary="Server properties, as llama-server's (context size, slots, template)")
    async def get_props() -> Any:
        return props(core)

    @app.get("/slots", summary="Each slot's state, as llama-server's")
    async def get_slots() -> Any:
        return slots(core)

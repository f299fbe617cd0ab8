"""The operator's and llama-server clients' endpoints (/metrics, /props, /slots, cached tokens in
usage) and embeddings, against one real server process with an API key."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_remote import KEY, server  # noqa: F401  one server per module, with an API key, as there
from test_server import ServerProcess

from gemmachat.engine import Engine

AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def scrape(server: ServerProcess) -> dict[str, float]:
    """Every sample of /metrics, by name, read with Prometheus' own parser (which raises on a line
    it cannot read)."""
    status, text = server.request("GET", "/metrics", headers=AUTH)
    assert status == 200, text
    samples = {sample.name: sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples}
    # Each metric once, and every line of the text a sample or its HELP/TYPE.
    assert len(text.strip().splitlines()) == 3 * len(samples)
    return samples


def test_metrics_move_by_exactly_what_the_usage_says(server: ServerProcess, client: openai.OpenAI) -> None:
    before = scrape(server)
    reply = client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=5, temperature=0,
                                           extra_body={"cache_prompt": False, "ignore_eos": True})
    after = scrape(server)
    usage = reply.usage
    assert usage.completion_tokens == 5 and usage.prompt_tokens_details.cached_tokens == 0

    def moved(name: str) -> float:
        return after[name] - before[name]

    assert moved("llamacpp:prompt_tokens_total") == usage.prompt_tokens
    assert moved("llamacpp:tokens_predicted_total") == 5
    assert moved("llamacpp:prompt_tokens_cached_total") == 0
    assert moved("gemmachat:requests_total") == 1
    # One decode for the short prompt, then one per sampled token but the last.
    assert moved("llamacpp:n_decode_total") == 1 + 4
    assert moved("llamacpp:prompt_seconds_total") > 0 and moved("llamacpp:tokens_predicted_seconds_total") > 0
    assert after["llamacpp:requests_processing"] == after["llamacpp:requests_deferred"] == 0
    assert after["llamacpp:predicted_tokens_seconds"] > 0

    # The same messages again: the slot that holds them reuses all but the last prompt token.
    again = client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=2, temperature=0)
    last = scrape(server)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert last["llamacpp:prompt_tokens_total"] - after["llamacpp:prompt_tokens_total"] == 1
    assert last["llamacpp:prompt_tokens_cached_total"] - after["llamacpp:prompt_tokens_cached_total"] == (
        again.usage.prompt_tokens - 1)
    # The throughput gauges cover the time since the previous scrape: nothing ran since.
    assert scrape(server)["llamacpp:predicted_tokens_seconds"] == 0


def test_operations_need_the_key_but_health_does_not(server: ServerProcess) -> None:
    for path in ("/metrics", "/props", "/slots"):
        status, body = server.request("GET", path)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, body)
    assert server.request("GET", "/health")[0] == 200


def test_props_and_slots_in_llama_servers_shape(server: ServerProcess, client: openai.OpenAI,
                                                engine: Engine, model_path: Path) -> None:
    status, props = server.request("GET", "/props", headers=AUTH)
    assert status == 200
    assert props["default_generation_settings"]["n_ctx"] == 2048  # -c 4096 over -np 2
    assert props["total_slots"] == 2
    assert props["model_path"] == model_path.name  # the name, never the directories above it
    assert props["chat_template"] == (engine.info.chat_template or "")
    assert "gemma-chat" in props["build_info"] and props["bos_token"] == "<bos>"
    reply = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Slots?"}],
                                           max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    status, slots = server.request("GET", "/slots", headers=AUTH)
    assert status == 200 and [slot["id"] for slot in slots] == [0, 1]
    assert all(slot["n_ctx"] == 2048 and slot["is_processing"] is False for slot in slots)
    # The slot that answered holds the prompt and the reply but its last token (never decoded).
    latest = [slot for slot in slots if slot.get("n_prompt_tokens") == reply.usage.prompt_tokens
              and slot["next_token"][0]["n_decoded"] == 3]
    assert latest and latest[0]["n_tokens_cached"] == reply.usage.prompt_tokens + 3 - 1

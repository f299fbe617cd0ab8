"""The operator's and llama-server clients' endpoints (/metrics, /props, /slots, cached tokens in
usage) and embeddings, against one real server process with an API key."""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_remote import KEY, server  # noqa: F401  one server per module, with an API key, as there
from test_server import ServerProcess

from gemmachat.engine import Engine
from gemmachat.openai_api import ApiError
from gemmachat.server.embeddings_routes import _text_tokens

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
    # Embeddings count apart: llama-server's counters are the generations'.
    embedded = client.embeddings.create(model="gemma", input=TEXTS[:2], encoding_format="float")
    final = scrape(server)
    assert final["gemmachat:embedding_requests_total"] - last["gemmachat:embedding_requests_total"] == 1
    assert final["gemmachat:embedding_tokens_total"] - last["gemmachat:embedding_tokens_total"] == (
        embedded.usage.prompt_tokens)
    assert final["gemmachat:embedding_seconds_total"] > last["gemmachat:embedding_seconds_total"]
    assert final["llamacpp:prompt_tokens_total"] == last["llamacpp:prompt_tokens_total"]


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


# -- embeddings ------------------------------------------------------------------------------------

TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "The cat sat on the mat."]


def unit(vector: list[float]) -> bool:
    return math.isclose(math.fsum(value * value for value in vector), 1.0, abs_tol=1e-5)


def test_openai_embeddings_are_the_models_unit_vectors_and_equal_native_llama_embeddings(
        client: openai.OpenAI, engine: Engine, native_command: Callable[[str], list[str]],
        model_path: Path) -> None:
    # The SDK asks for base64 unless told otherwise; float is asked for explicitly.
    packed = client.embeddings.create(model="gemma", input=TEXTS)
    plain = client.embeddings.create(model="gemma", input=TEXTS, encoding_format="float")
    vectors = [item.embedding for item in plain.data]
    assert [item.index for item in plain.data] == [0, 1, 2]
    assert all(len(vector) == engine.n_embd == 640 and unit(vector) for vector in vectors)
    assert vectors[0] == vectors[2]  # the same text, the same vector
    assert math.fsum(a * b for a, b in zip(vectors[0], vectors[1])) < 0.99  # different texts differ
    for floats, item in zip(vectors, packed.data):  # base64 carries float32
        assert max(abs(a - b) for a, b in zip(floats, item.embedding)) < 1e-6
    assert plain.usage.prompt_tokens == sum(len(engine.tokenize(text, add_bos=True)) for text in TEXTS)
    tokens = engine.tokenize(TEXTS[0], add_bos=True)
    by_tokens = client.embeddings.create(model="gemma", input=tokens, encoding_format="float")
    assert by_tokens.data[0].embedding == vectors[0]
    assert by_tokens.usage.prompt_tokens == len(tokens)
    # llama.cpp pools nothing for a GGUF that names no pooling: mean is what we use for it.
    # llama-embedding pools each text in one batch; we, past 128 tokens, in chunks
    # (gemmachat/embeddings.py): the long text checks that the chunks' mean is the same.
    long_text = "Rivers run to the sea, and the sea is never full. " * 20
    assert len(engine.tokenize(long_text, add_bos=True)) > 2 * 128
    texts = [TEXTS[0], long_text]
    # One llama-embedding run per text, as we embed each alone: values there move by up to 5e-3 with
    # what shares the batch and with the batch's size (llama.cpp's matrix kernels change with them).
    theirs = []
    for text in texts:
        native = subprocess.run([*native_command("llama-embedding"), "-m", str(model_path), "--pooling", "mean",
                                 "--embd-normalize", "2", "--embd-output-format", "array", "-t", "2", "-c", "512",
                                 "-p", text], capture_output=True, text=True, timeout=120)
        assert native.returncode == 0, native.stderr[-2000:]
        theirs += json.loads(native.stdout)
    ours = [item.embedding for item in client.embeddings.create(model="gemma", input=texts,
                                                                encoding_format="float").data]
    assert len(theirs) == len(ours) == 2
    # One chunk, one batch: the same sums.
    assert max(abs(a - b) for a, b in zip(ours[0], theirs[0])) < 1e-6
    # In chunks the batch split moves each value by up to 2e-4 (1 - cosine 3e-7); the mean of only
    # the first 200 tokens, say, would be 1.6e-3 away.
    assert 1 - math.fsum(a * b for a, b in zip(ours[1], theirs[1])) < 1e-5


def test_ollama_embed_and_the_older_embeddings_call(server: ServerProcess, client: openai.OpenAI) -> None:
    talk = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    embedded = talk.embed(model="gemma", input=TEXTS[:2])
    openai_style = client.embeddings.create(model="gemma", input=TEXTS[:2], encoding_format="float")
    assert embedded.embeddings == [item.embedding for item in openai_style.data]
    assert embedded.prompt_eval_count == openai_style.usage.prompt_tokens
    # The older call answers as Ollama's does: the pooled vector, not normalised.
    raw = talk.embeddings(model="gemma", prompt=TEXTS[0]).embedding
    norm = math.sqrt(math.fsum(value * value for value in raw))
    assert not math.isclose(norm, 1.0, abs_tol=1e-3)
    assert max(abs(value / norm - expected) for value, expected in zip(raw, embedded.embeddings[0])) < 1e-6
    # Too long for the context, with truncate off (see below for on, Ollama's default).
    with pytest.raises(ollama.ResponseError) as error:
        talk.embed(model="gemma", input="word " * 5000, truncate=False)
    assert error.value.status_code == 400 and "2048 tokens" in str(error.value)


def test_truncate_cuts_an_input_to_the_context(engine: Engine) -> None:
    # Without the embedding itself: one of a whole context takes most of a minute on 2 busy cores,
    # too long for this suite; the server answered it by hand.
    core = SimpleNamespace(engine=engine, settings=SimpleNamespace(special=False))
    text = "word " * 5000
    whole = engine.tokenize(text, add_bos=True, limit=10_000)
    assert len(whole) > engine.n_ctx_seq
    assert _text_tokens(core, text, "input", truncate=True) == whole[:engine.n_ctx_seq]
    with pytest.raises(ApiError, match="more than the 2048 tokens"):
        _text_tokens(core, text, "input", truncate=False)


def test_a_client_that_hangs_up_stops_its_embedding(server: ServerProcess) -> None:
    # 1,500 tokens take tens of seconds; the work stops at the next chunk of 128 instead.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/embeddings", body=json.dumps({"input": "word " * 1500}),
                       headers={"Content-Type": "application/json", **AUTH})
    time.sleep(1)
    connection.close()
    deadline = time.monotonic() + 15
    while not server.log_lines('"POST /v1/embeddings" 499'):
        assert time.monotonic() < deadline, server.lines[-5:]
        time.sleep(0.2)
    assert server.request("GET", "/health")[1]["slots_idle"] == 2


@pytest.mark.parametrize("body, message", [
    ({"input": "word " * 5000}, "input is more than the 2048 tokens an embedding can take"),
    ({"input": ["fine", "word " * 5000]}, "input[1] is more than the 2048 tokens"),
    ({"input": []}, "input is empty"),
    ({"input": [[]]}, "input is empty"),
    ({"input": [1, 2, 10**9]}, "token 1000000000 is not in the vocabulary"),
    ({"input": "hi", "encoding_format": "hex"}, "invalid value for 'encoding_format'"),
    ({"input": "hi", "dimensions": 64}, "dimensions 64 is not supported"),
    ({"input": ["x"] * 2049}, "2049 inputs are more than the 2048"),
])
def test_bad_embedding_requests_are_one_line_400s(server: ServerProcess, body: dict, message: str) -> None:
    status, answer = server.request("POST", "/v1/embeddings", body, headers=AUTH)
    assert status == 400 and message in answer["error"]["message"], answer
    assert "\n" not in answer["error"]["message"]

"""The OpenAI-compatible server, for real: a server process on 127.0.0.1, the official `openai`
client and raw HTTP against it, and the background server in-process on a shared engine."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import openai
import pytest

from gemmachat import llama_log
from gemmachat.engine import Engine, EngineOptions
from gemmachat.errors import UserError
from gemmachat.gguf import read_gguf
from gemmachat.listen import ServerUnavailable, bind_socket
from gemmachat.server import start_background
from gemmachat.settings import BASE_MODEL_REPLY_CAP, Sampling, parse_settings
from gemmachat.templates import Message, Segment, load_template, render, to_tokens

REPO = Path(__file__).resolve().parent.parent
# The server as users start it: `gemma-chat --server ARGS`.
SERVER = [sys.executable, "-m", "gemmachat", "--server", "--nobrowser"]
# Prompts evaluated from scratch: a reused KV prefix was computed in a batch of another size, and
# this small model's near-ties can tip either way on such rounding differences.
GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 42, "extra_body": {"cache_prompt": False}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A real server process; its stderr lines are collected as they come."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [*SERVER, "--port", str(self.port), "-c", "4096", "-np", "2", "-t", "2", *args],
            env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 60
        while not any("serving http://" in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start: {self.lines}")
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def log_lines(self, fragment: str) -> list[str]:
        return [line for line in self.lines if fragment in line]

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, Any]:
        status, data = raw_request(self.port, method, path, body, headers, timeout)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode("utf-8", "replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)


def raw_request(port: int, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, bytes]:
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def server(server_env: dict[str, str], model_path: Path) -> Iterator[ServerProcess]:
    running = ServerProcess(server_env)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_tokens(engine: Engine, text: str) -> list[int]:
    return to_tokens(engine, render(load_template("gemma"), None, [Message("user", text)]))


def greedy_completion(engine: Engine, prompt: str, max_tokens: int) -> str:
    tokens = to_tokens(engine, [Segment(prompt, False)])
    return engine.generate(engine.new_sequence(), tokens, Sampling(temperature=0), max_tokens=max_tokens).text()


def open_stream(port: int, body: dict[str, Any]) -> http.client.HTTPConnection:
    """A streamed completion of `body` whose first three chunks have arrived."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    for _ in range(3):
        assert response.readline().startswith(b"data: ")
        response.readline()
    return connection


def assert_alive(server: ServerProcess) -> None:
    status, body = server.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"


# -- the official client -----------------------------------------------------------------------------


def test_chat_streamed_equals_not_streamed_and_usage_is_right(client: openai.OpenAI, engine: Engine) -> None:
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    whole = client.chat.completions.create(model="gemma", messages=messages, max_tokens=12, **GREEDY)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.usage.prompt_tokens == len(chat_tokens(engine, messages[0]["content"]))
    assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(client.chat.completions.create(model="gemma", messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == choice.message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_system_prompt_and_history_are_rendered_with_the_gemma_template(client: openai.OpenAI,
                                                                        engine: Engine) -> None:
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "How are you?"},
    ]
    reply = client.chat.completions.create(model="gemma", messages=messages, max_tokens=2, **GREEDY)
    expected = to_tokens(engine, render(load_template("gemma"), "Answer in French.", [
        Message("user", "Hello"), Message("assistant", "Bonjour"), Message("user", "How are you?")]))
    assert reply.usage.prompt_tokens == len(expected)


def test_completions_match_the_engine_streamed_or_not(client: openai.OpenAI, engine: Engine) -> None:
    prompt = "The capital of France is"
    expected = greedy_completion(engine, prompt, 10)
    whole = client.completions.create(model="gemma", prompt=prompt, max_tokens=10, **GREEDY)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(to_tokens(engine, [Segment(prompt, False)]))
    assert whole.usage.completion_tokens == 10
    streamed = client.completions.create(model="gemma", prompt=prompt, max_tokens=10, stream=True, **GREEDY)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected
    echoed = client.completions.create(model="gemma", prompt=prompt, max_tokens=10, echo=True, **GREEDY)
    assert echoed.choices[0].text == prompt + expected


def test_stop_strings_end_the_reply_before_them(client: openai.OpenAI, engine: Engine) -> None:
    prompt = "1, 2, 3, 4,"
    full = greedy_completion(engine, prompt, 16)
    assert "7" in full, full
    cut = client.completions.create(model="gemma", prompt=prompt, max_tokens=16, stop=["7"], **GREEDY)
    assert cut.choices[0].text == full[:full.index("7")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="gemma", prompt=prompt, max_tokens=16, stop="7", stream=True,
                                         **GREEDY)
    assert "".join(chunk.choices[0].text for chunk in streamed) == full[:full.index("7")]


def long_reply(client: openai.OpenAI, **limit: Any) -> tuple[str | None, int]:
    """A chat reply that would run to the end of the slot but for a limit: (finish_reason, tokens)."""
    reply = client.with_options(timeout=600).chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Count to a thousand."}], temperature=0,
        extra_body={"ignore_eos": True, "cache_prompt": False}, **limit)
    return reply.choices[0].finish_reason, reply.usage.completion_tokens


def test_a_base_model_reply_without_max_tokens_is_capped_as_in_the_chat(client: openai.OpenAI,
                                                                        server: ServerProcess) -> None:
    # The default model has no chat template: without a cap these would run to the end of the slot.
    def null_completion() -> tuple[str, int]:
        status, reply = server.request("POST", "/v1/completions", {
            "prompt": "1, 2, 3,", "max_tokens": None, "ignore_eos": True, "temperature": 0}, timeout=600)
        assert status == 200, reply
        return reply["choices"][0]["finish_reason"], reply["usage"]["completion_tokens"]

    with ThreadPoolExecutor(2) as pool:  # the server's two slots, decoded together
        chat, completion = pool.submit(long_reply, client), pool.submit(null_completion)
        assert chat.result() == ("length", BASE_MODEL_REPLY_CAP)
        assert completion.result() == ("length", BASE_MODEL_REPLY_CAP)
    # A request's own max_tokens still goes past the cap.
    assert long_reply(client, max_tokens=BASE_MODEL_REPLY_CAP + 8) == ("length", BASE_MODEL_REPLY_CAP + 8)


def test_n_on_the_command_line_replaces_the_cap_and_a_request_still_wins(server_env: dict[str, str],
                                                                          model_path: Path) -> None:
    limited = ServerProcess(server_env, "-n", "20")
    try:
        client = openai.OpenAI(base_url=limited.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert long_reply(client) == ("length", 20)
        assert long_reply(client, max_completion_tokens=30) == ("length", 30)
    finally:
        limited.stop()


def test_models_and_health(client: openai.OpenAI, server: ServerProcess, model_path: Path) -> None:
    models = client.models.list().data
    assert [model.id for model in models] == [model_path.name]
    assert client.models.retrieve(model_path.name).owned_by == "gemma-chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, body = server.request("GET", "/health")
    assert status == 200 and body == {"status": "ok", "slots_idle": 2, "slots_processing": 0,
                                      "requests_waiting": 0}


def test_tokenize_and_detokenize_round_trip(server: ServerProcess, engine: Engine) -> None:
    text = "Hello, wörld! 🙂 <start_of_turn>"
    status, body = server.request("POST", "/tokenize", {"content": text})
    assert status == 200
    assert body["tokens"] == engine.tokenize(text, special=True)
    status, back = server.request("POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back == {"content": text}
    status, with_bos = server.request("POST", "/tokenize", {"content": "Hi", "add_special": True,
                                                            "with_pieces": True})
    assert with_bos["tokens"][0] == {"id": engine.bos, "piece": "<bos>"}
    assert "".join(piece["piece"] for piece in with_bos["tokens"][1:]) == "Hi"


def test_openapi_schema_is_published(server: ServerProcess) -> None:
    status, schema = server.request("GET", "/openapi.json")
    assert status == 200
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/tokenize", "/detokenize",
                 "/v1/embeddings", "/metrics", "/props", "/slots", "/api/embed"):
        assert path in schema["paths"]


def test_the_model_cards_curl_example_works(server: ServerProcess) -> None:
    # Exactly the body the llamafile Gemma cards send; and once more as `curl -d` sends it,
    # labelled as a form.
    body = '{"model": "gemma-27b-it", "messages": [{"role": "user", "content": "Say this is a test!"}], ' \
           '"temperature": 0.0, "max_tokens": 6}'
    status, reply = server.request("POST", "/v1/chat/completions", body)
    assert status == 200 and reply["choices"][0]["message"]["content"]
    status, again = server.request("POST", "/v1/chat/completions", body,
                                   {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and again["choices"][0]["message"] == reply["choices"][0]["message"]


# -- concurrency --------------------------------------------------------------------------------------


def test_eight_concurrent_clients_all_finish_without_cross_talk(client: openai.OpenAI, server: ServerProcess) -> None:
    # Lists whose continuation is far from any near-tie: with the unified KV cache, another
    # sequence's cells change the rounding of attention a little, which can tip a near-tie (as in
    # llama.cpp's own server); that is not cross-talk, and these prompts stay clear of it.
    prompts = ["1, 2, 3, 4, 5,", "Monday, Tuesday, Wednesday,", "A, B, C, D, E,", "January, February, March,",
               "10, 20, 30, 40,", "red, orange, yellow,", "one, two, three, four,", "2, 4, 6, 8,"]

    def ask(prompt: str) -> str:
        return client.completions.create(model="gemma", prompt=prompt, max_tokens=6, **GREEDY).choices[0].text

    alone = [ask(prompt) for prompt in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert_alive(server)


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(server: ServerProcess, client: openai.OpenAI) -> None:
    # Two streams fill both slots and hang up after a few chunks; a third request must then be
    # answered at once, not after 1500 tokens.
    for _ in range(2):
        connection = open_stream(server.port, {"prompt": "1, 2, 3,", "max_tokens": 1500, "temperature": 0})
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
    # A client that gives up on a long non-streamed request is noticed too.
    with pytest.raises(TimeoutError):
        raw_request(server.port, "POST", "/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 1500}, timeout=1)
    started = time.monotonic()
    reply = client.completions.create(model="gemma", prompt="Hello", max_tokens=4, **GREEDY)
    assert reply.choices[0].text
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while len(server.log_lines("cancelled")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = server.log_lines("cancelled")
    assert len(cancelled) == 3, server.lines
    assert all(int(line.split("generated ")[1].split(",")[0]) < 1500 for line in cancelled)
    # The unstreamed one never got its answer: 499, nginx's "client closed request" (it said 200).
    # The streams had theirs begun, with 200.
    assert sum('"POST /v1/completions" 499 ' in line for line in cancelled) == 1, cancelled
    status, health = server.request("GET", "/health")
    assert health["slots_processing"] == 0


# -- bad input ---------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "Hi"}]
BAD_REQUESTS = {
    "malformed JSON": ("/v1/chat/completions", '{"messages": [', 400, "not valid JSON"),
    "not an object": ("/v1/chat/completions", "[1, 2]", 400, "JSON object"),
    "messages wrong type": ("/v1/chat/completions", {"messages": "Hi"}, 400, "messages"),
    "temperature wrong type": ("/v1/chat/completions", {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    "stream wrong type": ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, 400, "stream"),
    "content wrong type": ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    "missing messages": ("/v1/chat/completions", {"model": "gemma"}, 400, "messages"),
    "empty messages": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "missing content": ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "content"),
    "system only": ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, 400, "user"),
    "unknown role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    "negative max_tokens": ("/v1/chat/completions", {"messages": USER, "max_tokens": -5}, 400, "max_tokens"),
    "zero max_completion_tokens": ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 0}, 400,
                                   "max_completion_tokens"),
    "absurd max_tokens": ("/v1/chat/completions", {"messages": USER, "max_tokens": 10**12}, 400, "too large"),
    "n > 1": ("/v1/chat/completions", {"messages": USER, "n": 3}, 400, "not supported"),
    "temperature out of range": ("/v1/chat/completions", {"messages": USER, "temperature": 7}, 400, "temperature"),
    "NaN": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', 400, "top_p"),
    "image content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "not supported"),
    "too long for the context": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 2100}]},
                                 400, "context holds"),
    "completion without prompt": ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    "completion, two prompts": ("/v1/completions", {"prompt": ["a", "b"]}, 400, "not supported"),
    "completion, n > 1": ("/v1/completions", {"prompt": "a", "n": 2}, 400, "not supported"),
    "completion, bad token": ("/v1/completions", {"prompt": [2, 99999999]}, 400, "vocabulary"),
    "completion too long": ("/v1/completions", {"prompt": "hello " * 2100}, 400, "context holds"),
    "bad logit_bias": ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    "detokenize bad token": ("/detokenize", {"tokens": [-1]}, 400, "vocabulary"),
    "tokenize without content": ("/tokenize", {}, 400, "content"),
    "empty body": ("/v1/chat/completions", b"", 400, "body is empty"),
    "not UTF-8": ("/v1/completions", b'{"prompt": "caf\xe9"}', 400, "not UTF-8, as JSON must be (byte 0xe9 at offset 15)"),
    "text part without text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
                               400, "has no 'text'"),
    "unknown endpoint": ("/v1/engines", {}, 404, "no such endpoint"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_openai_error_and_the_server_lives_on(server: ServerProcess, case: str) -> None:
    path, body, expected_status, fragment = BAD_REQUESTS[case]
    status, reply = server.request("POST", path, body)
    assert status == expected_status, reply
    error = reply["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["type"] == "invalid_request_error"
    assert fragment.lower() in error["message"].lower(), error
    assert "\n" not in error["message"]
    assert_alive(server)


def test_wrong_method_is_405_with_an_openai_error(server: ServerProcess) -> None:
    status, reply = server.request("DELETE", "/v1/chat/completions")
    assert status == 405 and reply["error"]["type"] == "invalid_request_error"


def test_a_body_over_the_limit_is_413(server: ServerProcess) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (10 * 1024 * 1024)}]})
    status, reply = server.request("POST", "/v1/chat/completions", big)
    assert status == 413 and "limit" in reply["error"]["message"]
    assert_alive(server)


def test_other_web_pages_and_other_host_names_are_refused(server: ServerProcess) -> None:
    """What a browser sends for another site's page (its Origin) and for a DNS-rebound name (its
    Host), against what the page itself and clients that are not browsers send. test_web.py sends
    them from a real browser."""
    port = server.port
    cases = [
        ({"Origin": "http://evil.example"}, "cross_origin_refused"),
        ({"Origin": f"http://127.0.0.1:{free_port()}"}, "cross_origin_refused"),  # this host, another port
        ({"Origin": "null"}, "cross_origin_refused"),  # a sandboxed frame, a file:// page
        ({"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}, "host_not_allowed"),
        ({"Host": f"evil.example:{port}"}, "host_not_allowed"),
        ({"Origin": f"http://127.0.0.1:{port}"}, None),
        ({"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}, None),
        ({"Host": f"[::1]:{port}"}, None),
        ({"Host": f"app.localhost:{port}"}, None),
        ({"Host": f"myllm:{port}"}, None),  # one label: an /etc/hosts alias, which public DNS cannot serve
        ({}, None),
    ]
    for headers, code in cases:
        status, reply = server.request("POST", "/tokenize", {"content": "hi"}, headers=headers)
        if code is None:
            assert status == 200 and reply["tokens"], (headers, reply)
        else:
            assert status == 403 and reply["error"]["code"] == code, (headers, reply)
    status, _ = server.request("GET", "/", headers={"Host": f"evil.example:{port}"})
    assert status == 403, "a rebound name does not even get the page"


def test_a_server_listening_everywhere_answers_any_name_but_not_other_pages() -> None:
    from gemmachat.server.same_origin import refusal

    rebound = {"host": "evil.example:8080"}
    assert refusal(rebound, "127.0.0.1", "127.0.0.1").code == "host_not_allowed"
    assert refusal(rebound, "127.0.0.1", "0.0.0.0") is None  # --host 0.0.0.0: its names are the user's
    assert refusal(rebound, "192.168.1.5", "192.168.1.5") is None
    assert refusal({**rebound, "origin": "http://other.example"}, "127.0.0.1", "0.0.0.0").code == (
        "cross_origin_refused")
    assert refusal({"host": "myhost.example:8080", "origin": "http://myhost.example:8080"}, "192.168.1.5",
                   "0.0.0.0") is None
    # Behind a reverse proxy at https://chat.example.com, whether it passes the Host on or not.
    proxy = parse_settings(["--server", "--allow-origin", "https://Chat.example.com/"]).allow_origins
    assert proxy == ("https://chat.example.com",)
    for host in ("chat.example.com", "127.0.0.1:8080"):
        assert refusal({"host": host, "origin": "https://chat.example.com"}, "127.0.0.1", "127.0.0.1", proxy) is None
    assert refusal({"host": "127.0.0.1:8080", "origin": "https://evil.example"}, "127.0.0.1", "127.0.0.1",
                   proxy).code == "cross_origin_refused"
    for bad in ("chat.example.com", "http://*.example.com", "http://localhost:3000:*"):
        with pytest.raises(UserError, match=f"--allow-origin '{re.escape(bad)}' is not an origin"):
            parse_settings(["--server", "--allow-origin", bad])
    # Patterns: every port of a host, every origin of a scheme (a browser extension's), every origin.
    patterns = parse_settings(["--server", "--allow-origin", "http://localhost:*,chrome-extension://*"]).allow_origins
    for origin, taken in [("http://localhost:3000", True), ("http://localhost", True), ("chrome-extension://abc", True),
                          ("http://localhost:3000.evil.example", False), ("http://localhost.evil.example", False),
                          ("https://localhost:3000", False), ("moz-extension://abc", False)]:
        assert (refusal({"host": "127.0.0.1:8080", "origin": origin}, "127.0.0.1", "127.0.0.1", patterns)
                is None) == taken, origin
    assert refusal({"host": "127.0.0.1:8080", "origin": "https://any.example"}, "127.0.0.1", "127.0.0.1", ("*",)) is None


def test_a_failing_request_is_one_500_and_one_log_line() -> None:
    """No route is known to fail now (the last one, a `true` JSON schema, is fixed): a stand-in app
    that raises, behind the real Gatekeeper. Before, the access line said 499 and uvicorn logged a
    whole traceback; the test client re-raises anything that escapes, so that would fail here too."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from gemmachat.server.app import Gatekeeper

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    lines: list[str] = []
    core = SimpleNamespace(api_key=None, max_body=1 << 20, verbose=False, log=lines.append, closing=False,
                           settings=SimpleNamespace(host="127.0.0.1", allow_origins=()))
    response = TestClient(Gatekeeper(failing, core)).post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal error: RuntimeError"
    assert lines[0] == "gemma-chat: POST /v1/completions failed: RuntimeError: boom"
    assert len(lines) == 2 and '"POST /v1/completions" 500 ' in lines[1], lines
    # Once the server is stopping, a request whose work it took away is a 503, as those it refuses.
    core.closing = True
    response = TestClient(Gatekeeper(failing, core)).post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert lines[2] == "gemma-chat: POST /v1/completions was cut by the shutdown: RuntimeError: boom"


def test_the_access_log_has_one_compact_line_per_request(server: ServerProcess) -> None:
    server.request("GET", "/v1/models")
    deadline = time.monotonic() + 5
    while not server.log_lines('"GET /v1/models" 200') and time.monotonic() < deadline:
        time.sleep(0.05)
    line = server.log_lines('"GET /v1/models" 200')[-1]
    assert line.startswith("127.0.0.1 ") and line.endswith("s")
    generated = server.log_lines('"POST /v1/completions" 200')
    assert generated and "tokens" in generated[0]


# -- process behaviour -------------------------------------------------------------------------------


def test_api_key_is_required_and_sigterm_stops_it_cleanly(server_env: dict[str, str], model_path: Path) -> None:
    keyed = ServerProcess(server_env, "--api-key", "s3cret")
    try:
        status, reply = keyed.request("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1})
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        status, reply = keyed.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and reply["error"]["type"] == "invalid_request_error"
        assert keyed.request("GET", "/health")[0] == 200  # health needs no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert good.completions.create(model="gemma", prompt="a", max_tokens=2).choices[0].text is not None

        # A long stream in flight: SIGTERM cancels it and the process exits 0 within 5 seconds.
        stream = good.completions.create(model="gemma", prompt="1, 2, 3,", max_tokens=1500, stream=True, **GREEDY)
        next(iter(stream))
        started = time.monotonic()
        keyed.process.send_signal(signal.SIGTERM)
        assert keyed.process.wait(10) == 0
        assert time.monotonic() - started < 5
        stream.close()
    finally:
        keyed.stop()
    assert not [line for line in keyed.lines if "Traceback" in line], keyed.lines


def test_an_empty_or_blank_api_key_is_refused_in_one_line(server_env: dict[str, str], tmp_path: Path) -> None:
    # `--api-key "$KEY"` with KEY unset must not serve without authentication; a key with a space
    # at either end could never be sent by a client.
    config = tmp_path / "config.toml"
    config.write_text('api-key = ""\n')
    cases = {"flag, empty": (["--api-key", ""], {}), "flag, blank": (["--api-key", " "], {}),
             "flag, padded": (["--api-key", " key"], {}), "environment": ([], {"GEMMA_CHAT_API_KEY": ""}),
             "config file": ([], {"GEMMA_CHAT_CONFIG": str(config)})}
    for case, (args, env) in cases.items():
        result = subprocess.run([*SERVER, "--port", str(free_port()), *args], env={**server_env, **env}, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (case, result.stderr)
        assert result.stderr.startswith("gemma-chat: the API key ") and result.stderr.count("\n") == 1, (case, result.stderr)


def test_a_taken_port_is_one_line_and_exit_2(server_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*SERVER, "--port", str(port)], env=server_env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
    # Unlike the chat's background server, --server never moves to another port.
    assert result.returncode == 2
    assert result.stderr == f"gemma-chat: port {port} is in use; choose another with --port\n"


# -- the background server, in-process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_engine(model_path: Path) -> Iterator[Engine]:
    llama_log.install(verbose=False)
    with Engine(model_path, read_gguf(model_path), EngineOptions(ctx_size=2048, threads=2, sequences=3)) as loaded:
        yield loaded


def test_background_server_shares_the_engine_with_the_chat(shared_engine: Engine, engine: Engine) -> None:
    port = free_port()
    settings = parse_settings(["--port", str(port)], environ={})
    lines: list[str] = []
    background = start_background(shared_engine, settings, [1, 2], log=lines.append)
    try:
        assert background.url == f"http://127.0.0.1:{port}"
        # The port is now taken: a second one fails at once, with one line.
        with pytest.raises(ServerUnavailable, match=f"port {port} is in use"):
            start_background(shared_engine, settings, [1, 2], log=lines.append)

        client = openai.OpenAI(base_url=background.url + "/v1", api_key="x", max_retries=0, timeout=60)
        # Prompts whose greedy tokens have no near-tie: "The capital of France is" (11th token) or
        # "Once upon a time" (4th: " small" 19.82 against " little" 19.77) can tip when decoded in a
        # batch of another size (docs/server.md, "temperature 0").
        prompt = "Monday, Tuesday, Wednesday,"
        expected = greedy_completion(engine, prompt, 12)
        chat_prompt = to_tokens(shared_engine, [Segment("1, 2, 3, 4, 5,", False)])
        chat_expected = greedy_completion(engine, "1, 2, 3, 4, 5,", 12)
        with ThreadPoolExecutor(2) as pool:
            replies = [pool.submit(lambda: client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                                                     **GREEDY).choices[0].text) for _ in range(2)]
            # Meanwhile the "chat" generates on sequence 0 of the same engine.
            chat = shared_engine.generate(shared_engine.new_sequence(0), chat_prompt, Sampling(temperature=0),
                                          max_tokens=12).text()
            assert [reply.result() for reply in replies] == [expected, expected]
        assert chat == chat_expected
        assert any('"POST /v1/completions" 200' in line for line in lines), lines
    finally:
        started = time.monotonic()
        background.stop()
        assert time.monotonic() - started < 5
    assert not background.running
    # Stopped means the port is free again.
    bind_socket("127.0.0.1", port).close()


def test_idle_slots_give_up_their_cache_for_a_prompt_that_needs_the_room(shared_engine: Engine) -> None:
    # One KV pool of 2048 cells for every sequence: a slot that keeps 1100 tokens of an old prompt
    # must not make the next 1100-token prompt on the other slot fail.
    settings = parse_settings(["--port", str(free_port())], environ={})
    background = start_background(shared_engine, settings, [1, 2], log=lambda line: None)
    try:
        client = openai.OpenAI(base_url=background.url + "/v1", api_key="x", max_retries=0, timeout=120)
        for word in ("apple", "river"):
            reply = client.completions.create(model="m", prompt=f"{word} " * 1100, max_tokens=2, temperature=0)
            assert reply.usage.prompt_tokens > 1100
        status, health = raw_request(int(background.url.rsplit(":", 1)[1]), "GET", "/health")
        assert status == 200 and json.loads(health)["slots_processing"] == 0
    finally:
        background.stop()


def test_the_slot_queue_is_first_come_first_served() -> None:
    import asyncio

    from gemmachat.engine import Sequence
    from gemmachat.server.slots import ServerClosing, SlotQueue

    async def scenario() -> list[str]:
        queue = SlotQueue([Sequence(1)])
        order: list[str] = []
        held = await queue.acquire([2, 5])

        async def client(name: str) -> None:
            try:
                sequence = await queue.acquire([2, 7])
            except ServerClosing:
                order.append(f"{name} refused")
                return
            order.append(name)
            await asyncio.sleep(0.01)
            queue.release(sequence)

        tasks = [asyncio.create_task(client(name)) for name in ("first", "second", "gives up", "third")]
        await asyncio.sleep(0.01)
        assert queue.waiting == 4
        tasks[2].cancel()  # a client that hangs up while waiting loses its place, not the slot
        queue.release(held)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert queue.idle == 1
        late = [asyncio.create_task(client("late")) for _ in range(1)]
        held = await queue.acquire([2])
        queue.close()
        await asyncio.gather(*late)
        return order

    assert asyncio.run(scenario()) == ["first", "second", "third", "late refused"]


def test_logprobs_in_openais_shapes_streamed_or_not(client: openai.OpenAI) -> None:
    asked = dict(model="gemma", messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=6,
                 logprobs=True, top_logprobs=3, **GREEDY)
    whole = client.chat.completions.create(**asked)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    assert "".join(entry.token for entry in entries) == whole.choices[0].message.content
    for entry in entries:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        alternatives = [top.logprob for top in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        # Greedy: the token taken is the most likely one.
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
    streamed = [part for chunk in client.chat.completions.create(**asked, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for part in chunk.choices[0].logprobs.content]
    assert [(part.token, round(part.logprob, 4)) for part in streamed] == [
        (entry.token, round(entry.logprob, 4)) for entry in entries]

    completion = client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=5,
                                           logprobs=2, echo=True, **GREEDY)
    choice = completion.choices[0]
    shaped = choice.logprobs
    assert len(shaped.tokens) == len(shaped.token_logprobs) == len(shaped.top_logprobs) == 5
    for token, offset in zip(shaped.tokens, shaped.text_offset):
        assert choice.text[offset:offset + len(token)] == token
    assert shaped.text_offset[0] == len("The capital of France is")
    assert all(len(top) <= 2 and max(top.values()) == logprob
               for top, logprob in zip(shaped.top_logprobs, shaped.token_logprobs))
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       top_logprobs=2)


def test_logprobs_equal_native_llama_servers(server: ServerProcess, native_command: Callable[[str], list[str]],
                                             model_path: Path) -> None:
    # Without --ctx-checkpoints 0, llama-server evaluates a prompt in two batches for Gemma's
    # sliding-window layers (checkpointing before its last tokens); this small model's logits move
    # by up to 0.13 with the batch split, more than any rounding the comparison should allow.
    port = free_port()
    native = subprocess.Popen([*native_command("llama-server"), "-m", str(model_path), "--port", str(port),
                               "-c", "4096", "-t", "2", "-np", "1", "--no-webui", "--ctx-checkpoints", "0"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if raw_request(port, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert native.poll() is None and time.monotonic() < deadline, "llama-server did not start"
            time.sleep(0.2)
        prompt = "The capital of France is"
        status, ours = server.request("POST", "/v1/completions", {
            "prompt": prompt, "max_tokens": 6, "logprobs": 5, "temperature": 0, "cache_prompt": False})
        assert status == 200, ours
        status, data = raw_request(port, "POST", "/completion", {
            "prompt": prompt, "n_predict": 6, "n_probs": 5, "temperature": 0, "cache_prompt": False})
        assert status == 200, data
        theirs = json.loads(data)["completion_probabilities"]
        ours = ours["choices"][0]["logprobs"]
        assert ours["tokens"] == [entry["token"] for entry in theirs]
        for logprob, top, entry in zip(ours["token_logprobs"], ours["top_logprobs"], theirs):
            assert logprob == pytest.approx(entry["logprob"], abs=2e-3)
            assert list(top) == [alternative["token"] for alternative in entry["top_logprobs"]]
            assert list(top.values()) == pytest.approx([a["logprob"] for a in entry["top_logprobs"]], abs=2e-3)
    finally:
        native.kill()
        native.wait(10)

"""Ollama's API, spoken by the official `ollama` client from PyPI, against the real server."""

from __future__ import annotations

import json

import jsonschema
import ollama
import pytest
from test_server import ServerProcess, raw_request, server  # noqa: F401  one server per module, as there

from gemmachat.engine import Engine
from gemmachat.server.ollama_routes import OllamaGenerateRequest

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def test_generate_raw_equals_the_openai_completion_streamed_or_not(client: ollama.Client, server: ServerProcess) -> None:
    options = {"temperature": 0, "num_predict": 12}
    whole = client.generate(model="gemma", prompt=PROMPT, raw=True, options=options)
    pieces = list(client.generate(model="gemma", prompt=PROMPT, raw=True, options=options, stream=True))
    status, openai_style = server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 12,
                                                                      "temperature": 0})
    assert status == 200
    assert whole.response == "".join(p.response for p in pieces) == openai_style["choices"][0]["text"]
    assert whole.done and pieces[-1].done and not pieces[0].done
    assert whole.eval_count == 12 and whole.done_reason == "length"
    assert whole.prompt_eval_count == openai_style["usage"]["prompt_tokens"]


def test_chat_uses_the_chat_template_and_options(client: ollama.Client, server: ServerProcess) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    reply = client.chat(model="gemma", messages=messages, options={"temperature": 0, "num_predict": 8, "seed": 1})
    status, openai_style = server.request("POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 8,
                                                                           "temperature": 0, "seed": 1})
    assert status == 200
    assert reply.message.role == "assistant"
    assert reply.message.content == openai_style["choices"][0]["message"]["content"]
    streamed = "".join(part.message.content for part in client.chat(
        model="gemma", messages=messages, options={"temperature": 0, "num_predict": 8, "seed": 1}, stream=True))
    assert streamed == reply.message.content


def test_format_json_and_a_schema(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    reply = client.chat(model="gemma", messages=[{"role": "user", "content": "A city as JSON."}], format=schema,
                        options={"temperature": 1, "num_predict": 100})
    assert set(json.loads(reply.message.content)) == {"city"}
    # "json" is any object: the base model may write one past any token limit, so a reply cut by
    # the limit is only checked as the start of an object; one that ends must parse.
    ended = 0
    for seed in range(1, 6):
        loose = client.generate(model="gemma", prompt="A dog as JSON:", format="json",
                                options={"num_predict": 120, "seed": seed})
        assert loose.response.startswith("{"), loose.response
        if loose.done_reason == "stop":
            assert isinstance(json.loads(loose.response), dict), loose.response
            ended += 1
    assert ended, "no reply ended within the limit"


def test_list_show_ps_and_version(client: ollama.Client, engine: Engine, server: ServerProcess) -> None:
    (listed,) = client.list().models
    assert listed.model == engine.name and listed.details.family == "gemma3"
    shown = client.show("gemma")
    assert shown.modelinfo["gemma3.context_length"] == engine.n_ctx_train
    (running,) = client.ps().models
    assert running.model == engine.name and running.context_length == 2048
    status, version = server.request("GET", "/api/version")
    assert status == 200 and version["version"]


def test_tools_round_trip_in_ollamas_shapes(client: ollama.Client, server: ServerProcess) -> None:
    # Ollama has no tool_choice: the model may answer or call (the grammar holds it to one of the
    # two, gemmachat/tools.py), so a few seeds are tried until one calls.
    from test_structured import TOOLS

    # The schemas as the client sends them: its Tool type keeps only type, properties, required
    # and enum, so the server never sees a pattern or a length (ollama 0.6.3), and cannot hold the
    # model to them.
    sent = [ollama.Tool.model_validate(tool).model_dump(exclude_none=True) for tool in TOOLS]
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in sent}
    assert "pattern" not in json.dumps(sent) and "pattern" in json.dumps(TOOLS)
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = None
    for seed in range(8):
        options = {"temperature": 1, "seed": seed, "num_predict": 40}
        reply = client.chat(model="gemma", messages=messages, tools=TOOLS, options=options)
        if not reply.message.tool_calls:
            assert isinstance(reply.message.content, str)
            continue
        for call in reply.message.tool_calls:
            jsonschema.validate(dict(call.function.arguments), schemas[call.function.name])
        called = reply.message
        # Streamed, the calls come whole in one line, then the closing one.
        parts = list(client.chat(model="gemma", messages=messages, tools=TOOLS, options=options, stream=True))
        assert parts[-1].done and not parts[0].done and len(parts) == 2
        for call in parts[0].message.tool_calls or []:
            jsonschema.validate(dict(call.function.arguments), schemas[call.function.name])
        break
    assert called is not None, "no seed of 8 called a tool"
    (call, *_) = called.tool_calls
    # The program runs the tool and hands its result back, as Ollama's own clients do.
    messages += [called, {"role": "tool", "content": '{"temperature": 21}', "tool_name": call.function.name}]
    second = client.chat(model="gemma", messages=messages, options={"temperature": 0, "num_predict": 8})
    assert second.message.content and not second.message.tool_calls
    alone = client.chat(model="gemma", messages=messages[:1], options={"num_predict": 1}).prompt_eval_count
    turns = [json.dumps({"tool_calls": [{"name": c.function.name, "arguments": dict(c.function.arguments)}
                                        for c in called.tool_calls]}),
             json.dumps({"tool_response": {"tool": call.function.name, "content": '{"temperature": 21}'}})]
    least = sum(len(server.request("POST", "/tokenize", {"content": turn})[1]["tokens"]) for turn in turns)
    assert least <= second.prompt_eval_count - alone < least + 24, (second.prompt_eval_count, alone, least)
    assert "tools" in client.show("gemma").capabilities


def test_a_request_with_nothing_to_say_only_loads_and_head_says_it_is_up(client: ollama.Client,
                                                                         server: ServerProcess) -> None:
    # What `ollama run` and apps send to load a model before it is needed: answered at once.
    generated = client.generate(model="gemma", prompt="")
    assert generated.done and generated.done_reason == "load" and generated.response == "" and not generated.eval_count
    chatted = client.chat(model="gemma", messages=[])
    assert chatted.done and chatted.done_reason == "load" and chatted.message.content == ""
    # keep_alive 0 asks to unload (`ollama stop` sends it): said so, and the model stays to serve.
    for keep_alive in (0, "0", "0s", "0h0m0s"):
        assert client.generate(model="gemma", prompt="", keep_alive=keep_alive).done_reason == "unload"
    assert client.chat(model="gemma", messages=[], keep_alive="0m").done_reason == "unload"
    assert client.generate(model="gemma", prompt="", keep_alive="5m").done_reason == "load"
    # Ollama's clients check that the server is up with HEAD / before they list or run.
    for path in ("/", "/api/tags", "/api/version"):
        assert raw_request(server.port, "HEAD", path) == (200, b""), path


def test_an_empty_format_is_no_format(client: ollama.Client) -> None:
    # langchain's OllamaLLM sends format "" with every request (the ollama client's type allows it):
    # each one was a 400.
    options = {"temperature": 0, "num_predict": 6}
    plain = client.generate(model="gemma", prompt=PROMPT, raw=True, options=options)
    assert client.generate(model="gemma", prompt=PROMPT, raw=True, options=options, format="").response == plain.response
    chatted = client.chat(model="gemma", messages=[{"role": "user", "content": "Hi"}], options=options, format="")
    assert chatted.done and chatted.eval_count


def test_what_would_be_silently_dropped_is_refused(client: ollama.Client) -> None:
    # Each was accepted and ignored: an editor's fill-in-the-middle got a plain continuation, a
    # template override was not applied, and thinking asked for never came.
    for fields, message in [({"suffix": "    return result"}, "suffix is not supported"),
                            ({"template": "{{ .Prompt }}"}, "template is not supported"),
                            ({"think": True}, "thinking is not supported by this model"),
                            ({"think": "high"}, "thinking is not supported by this model")]:
        with pytest.raises(ollama.ResponseError) as error:
            client.generate(model="gemma", prompt="def add(a, b):", options={"num_predict": 2}, **fields)
        assert error.value.status_code == 400 and error.value.error.startswith(message), (fields, error.value)
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="gemma", messages=[{"role": "user", "content": "x"}], think=True)
    assert error.value.status_code == 400 and error.value.error == "thinking is not supported by this model"
    # Their empty or false forms are what clients send by default: taken.
    assert client.generate(model="gemma", prompt="x", options={"num_predict": 1}, suffix="", think=False).done


def test_bad_requests_are_4xx_with_ollamas_error_shape(client: ollama.Client) -> None:
    # Ollama's {"error": "text"}: the client's ResponseError.error is the text (it was a dict).
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="gemma", messages=[{"role": "user", "content": "x"}], format={"type": "integer", "minimum": 1})
    assert error.value.status_code == 400 and isinstance(error.value.error, str) and "minimum" in error.value.error
    # An image would be dropped, and the reply would talk about a picture the model never saw.
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="gemma", messages=[{"role": "user", "content": "What is this?", "images": [b"GIF89a"]}])
    assert error.value.status_code == 400 and error.value.error == "images are not supported (text only)"
    # A client's num_ctx cannot make a request's context larger here: the 400 says what can.
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model="gemma", prompt="hello " * 2500, options={"num_ctx": 8192, "num_predict": 2})
    assert error.value.status_code == 400 and error.value.error.endswith(
        "(a request gets 2048 tokens here: the server's context of 4096 over 2 slots; -c and -np set them)"), error.value
    # Ollama's options are free-form in its schema: a bad value is a 400 that names the option. A
    # num_predict past the context is not one: Ollama stops where the context is full.
    assert OllamaGenerateRequest(options={"num_predict": 10**9}).openai_fields(2048)["max_tokens"] == 2048
    for call in (lambda options: client.chat(model="gemma", messages=[{"role": "user", "content": "x"}], options=options),
                 lambda options: client.generate(model="gemma", prompt="x", raw=True, options=options)):
        with pytest.raises(ollama.ResponseError) as error:
            call({"repeat_penalty": [], "num_predict": 2})
        assert error.value.status_code == 400 and "options.repeat_penalty" in error.value.error, error.value

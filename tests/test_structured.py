"""Structured output: JSON schemas and grammars, enforced by llama.cpp's grammar sampler.

The real model at temperature 1 (the hardest case for a constraint), the real server, the
official openai SDK's `parse` with pydantic models, and jsonschema as the judge.
"""

from __future__ import annotations

import datetime
import enum
import json
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

import jsonschema
import openai
import pydantic
import pytest
from pydantic import BaseModel, Field
from test_server import ServerProcess, client, server  # noqa: F401  one server per module, as there

from gemmachat.structured import SchemaRefused, grammar_for_schema
from gemmachat.tools import _response_so_far

Name = Field(max_length=24)  # the base model could otherwise write one string to the token limit


class Colour(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Point(BaseModel):
    x: int
    y: int


class Person(BaseModel):
    name: str = Name
    age: int


class Circle(BaseModel):
    kind: Literal["circle"]
    radius: int


class Square(BaseModel):
    kind: Literal["square"]
    side: int


SCHEMAS: list[type[BaseModel]] = [
    Point,
    Person,
    pydantic.create_model("Flag", on=(bool, ...)),
    pydantic.create_model("Price", amount=(float, ...), currency=(Literal["EUR", "USD"], ...)),
    pydantic.create_model("Paint", colour=(Colour, ...)),
    pydantic.create_model("Maybe", nickname=(Optional[str], Field(max_length=24))),
    pydantic.create_model("Tags", tags=(list[str], Field(max_length=3)), count=(int, ...)),
    pydantic.create_model("Line", start=(Point, ...), end=(Point, ...)),
    pydantic.create_model("Team", members=(list[Person], Field(max_length=2))),
    pydantic.create_model("Event", day=(datetime.date, ...)),
    pydantic.create_model("Stamp", at=(datetime.datetime, ...)),
    pydantic.create_model("Ticket", id=(uuid.UUID, ...)),
    pydantic.create_model("Code", code=(str, Field(pattern=r"^[A-Z]{3}-[0-9]{2}$"))),
    pydantic.create_model("Pair", pair=(tuple[int, str], ...)),
    pydantic.create_model("Either", value=(int | bool, ...)),
    pydantic.create_model("Const", kind=(Literal["circle"], ...), radius=(int, ...)),
    pydantic.create_model("Nested", outer=(pydantic.create_model("Inner", inner=(Person, ...)), ...)),
    pydantic.create_model("Shape", shape=(Circle | Square, ...)),
    pydantic.create_model("Matrix", rows=(list[list[int]], Field(max_length=2))),
    pydantic.create_model("Record", title=(str, Name), done=(bool, ...), rank=(Optional[int], ...),
                          colour=(Colour, ...)),
]


@pytest.mark.parametrize("model", SCHEMAS, ids=[model.__name__ for model in SCHEMAS])
def test_parse_returns_a_valid_object_at_temperature_1(client: openai.OpenAI, model: type[BaseModel]) -> None:
    completion = client.chat.completions.parse(
        model="gemma", response_format=model, temperature=1.0, max_tokens=400, seed=7,
        messages=[{"role": "user", "content": f"Give an example {model.__name__} as JSON."}])
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, model), message.content


# Free-form parts, as pydantic writes `dict[str, Any]` and `Any`, and tool and MCP schemas hold:
# `true`, `{}`, annotations alone, `additionalProperties: true`. The converter gave a 500 on `true`
# and refused the rest.
LOOSE_SCHEMAS = [
    True,
    {"title": "Anything", "description": "a whole free-form document"},
    {"type": "object", "properties": {"meta": {"type": "object", "additionalProperties": True},
                                      "note": {"description": "any value"}, "flag": True},
     "required": ["meta", "note", "flag"]},
    {"type": "array", "items": True, "maxItems": 2},
    {"type": "array", "prefixItems": [{"type": "integer"}, {}], "items": False},
    pydantic.create_model("Loose", meta=(dict[str, Any], ...), note=(Any, ...)).model_json_schema(),
]


@pytest.mark.parametrize("schema", LOOSE_SCHEMAS, ids=range(len(LOOSE_SCHEMAS)))
def test_loose_parts_of_a_schema_are_taken_and_the_output_is_valid(client: openai.OpenAI, schema: Any) -> None:
    # A free-form object has no bound, and greedy decoding loops inside one: seeds are tried until
    # a reply ends within the limit (the first or second, measured), and that one must be valid.
    for seed in range(1, 5):
        choice = client.chat.completions.create(
            model="gemma", temperature=1.0, seed=seed, max_tokens=120,
            messages=[{"role": "user", "content": "Some JSON, please."}],
            response_format={"type": "json_schema", "json_schema": {"name": "loose", "schema": schema}}).choices[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), schema)
            return
    pytest.fail(f"no reply of 4 ended within the limit; the last: {choice.message.content}")


def test_json_object_is_any_object_streamed_too(client: openai.OpenAI) -> None:
    # Any object has no bound: the base model may write one past the token limit, so a reply cut
    # there is only checked as the start of an object; one that ends must parse.
    ended = 0
    for seed in range(3, 6):
        stream = client.chat.completions.create(
            model="gemma", response_format={"type": "json_object"}, temperature=1.0, max_tokens=200, seed=seed,
            stream=True, messages=[{"role": "user", "content": "Describe a cat as JSON."}])
        chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
        text = "".join(chunk.delta.content or "" for chunk in chunks)
        assert text.startswith("{"), text
        if chunks[-1].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
            ended += 1
    assert ended, "no reply ended within the limit"


def test_strings_hold_no_raw_control_characters_even_when_the_model_wants_them(server: ServerProcess) -> None:
    # llama-cpp-python's converter let a raw newline or tab into a string, which no JSON parser
    # accepts: biased hard towards them, the model must still write only escapes.
    wanted = []
    for text in ("\n", "\t", "\n\n"):
        status, body = server.request("POST", "/tokenize", {"content": text})
        assert status == 200, body
        wanted += body["tokens"]
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 12}, "b": {"type": "string",
              "pattern": "^x.y$"}}, "required": ["a", "b"], "additionalProperties": False}
    for response_format in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}):
        status, body = server.request("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Some JSON."}], "max_tokens": 40, "temperature": 1.0, "seed": 5,
            "response_format": response_format, "logit_bias": {str(token): 100 for token in wanted}})
        assert status == 200, body
        text = body["choices"][0]["message"]["content"]
        assert text.startswith("{") and not any(ord(c) < 0x20 or c == "\x7f" for c in text), repr(text)
    jsonschema.validate(json.loads(text), schema)


def test_completions_take_llama_cpp_grammar_and_json_schema(server: ServerProcess) -> None:
    status, body = server.request("POST", "/v1/completions", {
        "prompt": "Is the sky blue? Answer:", "max_tokens": 8, "temperature": 1.0,
        "grammar": 'root ::= " yes" | " no"'})
    assert status == 200 and body["choices"][0]["text"] in (" yes", " no"), body
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}
    # Room for the longest array the grammar allows: 4 integers of 16 digits, a token each.
    status, body = server.request("POST", "/v1/completions", {
        "prompt": "Some numbers:", "max_tokens": 90, "temperature": 1.0, "json_schema": schema})
    assert status == 200, body
    jsonschema.validate(json.loads(body["choices"][0]["text"]), schema)


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "integer", "minimum": 3}, "'minimum'"),
    ({"type": "string", "format": "email"}, "'email'"),
    ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "'patternProperties'"),
    ({"$ref": "https://example.com/schema.json"}, "local $ref"),
    ({"type": "wat"}, "unknown type"),
    # The converter would pass over a constraint beside the branch it takes: refused, not dropped.
    ({"anyOf": [{"type": "integer"}, {"type": "string"}], "maxLength": 24}, "'maxLength'"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "'maxLength'"),
    # false matches nothing: a property that must be absent, an array that must be empty.
    ({"type": "object", "properties": {"a": False}}, "#/properties/a is false"),
    ({"type": "array", "items": False}, "'items': false"),
])
def test_a_constraint_that_cannot_be_enforced_is_a_400_naming_it(server: ServerProcess, schema: dict,
                                                                   named: str) -> None:
    status, body = server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert status == 400 and body["error"]["param"] == "response_format", body
    assert named in body["error"]["message"]


def test_pathological_schemas_and_grammars_are_refused_quickly(server: ServerProcess) -> None:
    deep: dict = {"type": "integer"}
    for _ in range(200):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaRefused, match="nests deeper"):
        grammar_for_schema(deep)
    wide = {"enum": list(range(10_000))}
    with pytest.raises(SchemaRefused, match="more than"):
        grammar_for_schema({"type": "object", "properties": {f"p{i}": wide for i in range(6_000)}})
    # Grammars llama.cpp cannot parse (or would recurse on forever) are a 400, never a stuck slot.
    for grammar in ("root ::= root", "root ::= ( ", "not a grammar", "root ::= x\n\x1b[31mred\x1b]0;title\x07"):
        status, body = server.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 4, "grammar": grammar})
        assert status == 400 and "refused the grammar" in body["error"]["message"], (grammar, body)
    # llama.cpp's parser wrote the reason and the client's grammar, escapes and all, to the server's
    # terminal; the 400 says it now, and nothing else reaches the log.
    assert not [line for line in server.lines if "error parsing grammar" in line or "\x1b" in line]
    status, _ = server.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 200, "the server still answers"


def test_cli_json_schema_and_grammar_flags(run_cli, tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
              "required": ["name", "tags"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    for seed in (1, 2, 3):
        result = run_cli("--cli", "-p", "A record as JSON:", "-n", "200", "--temp", "1", "--seed", str(seed),
                         "--json-schema", f"@{tmp_path / 'schema.json'}")
        assert result.returncode == 0, result.stderr
        jsonschema.validate(json.loads(result.stdout), schema)
    answer = run_cli("--cli", "-p", "Answer:", "-n", "8", "--temp", "0", "--grammar", 'root ::= "yes" | "no"')
    assert answer.returncode == 0 and answer.stdout in ("yes", "no"), answer.stderr
    refused = run_cli("--cli", "-p", "x", "--json-schema", '{"type": "integer", "maximum": 3}')
    assert refused.returncode == 2 and "'maximum'" in refused.stderr and len(refused.stderr.splitlines()) == 1
    both = run_cli("--cli", "-p", "x", "--grammar", "root ::= \"a\"", "--json-schema", "{}")
    assert both.returncode == 2 and "give one of" in both.stderr
    # llama.cpp's parser prints its reason and the whole grammar itself: kept, and made our one line.
    garbage = run_cli("--cli", "-p", "x", "--grammar", "garbage")
    assert garbage.returncode == 2
    assert garbage.stderr == "gemma-chat: llama.cpp refused the grammar: expecting ::= at\n"


# Letters only, and few: every call the grammar allows ends well inside the token limits below.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Za-z/]{1,12}$"}},
             "required": ["zone"], "additionalProperties": False}}}]


def test_the_openai_sdks_tool_call_loop_round_trips(client: openai.OpenAI, server: ServerProcess) -> None:
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="gemma", messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=2, max_tokens=60)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    # The program runs the tool and hands its result back, as the SDK's loop does.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model="gemma", messages=messages, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=12)
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content
    # The call and its result reached the prompt, as JSON (gemmachat/tools.py); the tools did not.
    alone = client.chat.completions.create(model="gemma", messages=messages[:1], max_tokens=1).usage.prompt_tokens
    turns = [json.dumps({"tool_calls": [{"name": call.function.name, "arguments": json.loads(call.function.arguments)}]}),
             json.dumps({"tool_response": {"tool": call.function.name, "content": '{"temperature": 21}'}})]
    least = sum(len(server.request("POST", "/tokenize", {"content": turn})[1]["tokens"]) for turn in turns)
    assert least <= second.usage.prompt_tokens - alone < least + 24, (second.usage, alone, least)

    named = client.chat.completions.create(
        model="gemma", messages=messages[:1], tools=TOOLS, stream=True, max_tokens=60, temperature=1.0, seed=3,
        parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    deltas = [chunk.choices[0] for chunk in named if chunk.choices]
    assert deltas[-1].finish_reason == "tool_calls"
    calls = [call for delta in deltas for call in delta.delta.tool_calls or []]
    assert calls and {call.function.name for call in calls} == {"get_time"}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas["get_time"])


def test_a_tool_reply_cut_by_max_tokens_is_its_text_so_far(client: openai.OpenAI) -> None:
    # Its content was the grammar's JSON wrapper as it stood: '{"response": "The wea'.
    for seed in range(3):
        reply = client.chat.completions.create(
            model="gemma", messages=[{"role": "user", "content": "Weather in Oslo, or a joke?"}], tools=TOOLS,
            temperature=1.0, seed=seed, max_tokens=6).choices[0]
        assert reply.finish_reason == "length" and reply.message.tool_calls is None
        assert '"response"' not in (reply.message.content or "") and "{" not in (reply.message.content or "")
    # Where the cut falls: mid-escape, after the string, inside a call.
    assert _response_so_far('{ "response" : "Caf\\u00') == "Caf"
    assert _response_so_far('{"response": "one\\ntwo\\') == "one\ntwo"
    assert _response_so_far('{"response": "done" ') == "done"
    assert _response_so_far('{"tool_calls": [{"name": "get_') == ""


def test_tool_choice_auto_gives_calls_or_text_and_bad_tools_are_400(client: openai.OpenAI) -> None:
    for seed in range(2):
        reply = client.chat.completions.create(
            model="gemma", messages=[{"role": "user", "content": "Weather in Oslo, or a joke?"}], tools=TOOLS,
            temperature=1.0, seed=seed, max_tokens=48, parallel_tool_calls=False).choices[0]
        if reply.finish_reason == "tool_calls":
            assert len(reply.message.tool_calls) == 1 and reply.message.content is None
        else:
            assert reply.message.tool_calls is None and isinstance(reply.message.content, str)
    bad = [({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
           ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
               "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}]}, r"'minimum' \(at tools\[0\].function.parameters/properties/n\)"),
           ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "cannot be used together"),
           ({"tool_choice": "required"}, "needs tools")]
    for fields, named in bad:
        with pytest.raises(openai.BadRequestError, match=named):
            client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, **fields)

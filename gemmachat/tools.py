"""OpenAI's `tools` for Gemma, which has no tool tokens: llama.cpp's "generic" tool format.

Gemma 3's chat template knows nothing of tools, so a request with tools gets what llama.cpp's
server gives any such model: the tools' definitions and a short instruction join the system
prompt, and the reply is held by the grammar sampler to one JSON object, either
`{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"response": "..."}`. The grammar is
the tools' own parameter schemas (gemmachat/structured.py), so a call always names a tool that
exists with arguments valid under its schema; `tool_choice` "required" or a named function
leaves only the call, "none" leaves the tools out altogether. Earlier calls and their results
go back to the model in the same JSON, as llama.cpp's template polyfill writes them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from gemmachat.structured import checked_schema, grammar_for_schema

INSTRUCTION = ("Respond in JSON format, either with `tool_calls` (a request to call tools) or with "
               "`response` (a reply to the user's request).")
MAX_TOOLS = 128


class ToolsRefused(ValueError):
    """Tools or a tool_choice that cannot be used: the server answers 400 with it."""


@dataclass(frozen=True)
class ToolPlan:
    """How one request's tools shape its prompt and its output."""

    system: str  # joins the request's system prompt
    grammar: str

    def calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The reply's content and its calls as the model wrote them ({"name", "arguments"}: Ollama's
        shape), from the JSON the grammar allowed. A reply cut short by max_tokens is not JSON yet:
        its content is the text of its response so far (the client showed the JSON wrapper), and a
        call cut short is no call."""
        try:
            reply = json.loads(text)
        except ValueError:
            return _response_so_far(text), []
        if "tool_calls" in reply:
            return None, reply["tool_calls"]
        return reply["response"], []

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The reply's content and tool calls in OpenAI's shape (arguments as a JSON string)."""
        content, calls = self.calls(text)
        return content, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}
                         for call in calls]


_RESPONSE_START = re.compile(r'\s*\{\s*"response"\s*:\s*"')


def _response_so_far(cut: str) -> str:
    """The text of a `{"response": "...` cut anywhere, an escape sequence included; "" for a cut
    tool call."""
    start = _RESPONSE_START.match(cut)
    if start is None:
        return ""
    body = cut[start.end():]
    for end in range(len(body), max(-1, len(body) - 7), -1):  # a cut escape is at most 6 long: \u00e9
        try:
            return json.loads(f'"{body[:end]}"')
        except ValueError:
            continue
    return ""


def plan_for(tools: list[Any], tool_choice: Any, parallel: bool | None) -> ToolPlan | None:
    """The plan for a request's tools; None when they play no part (no tools, or choice "none")."""
    if not tools:
        if tool_choice == "required" or isinstance(tool_choice, dict):
            raise ToolsRefused(f"tool_choice {json.dumps(tool_choice)} needs tools, and none were given")
        return None
    if tool_choice == "none":
        return None
    if len(tools) > MAX_TOOLS:
        raise ToolsRefused(f"at most {MAX_TOOLS} tools")
    functions = [_function(tool, index) for index, tool in enumerate(tools)]
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        chosen = [f for f in functions if f["name"] == wanted]
        if not chosen:
            raise ToolsRefused(f"tool_choice names {wanted!r}, which is not one of the tools")
        functions, required = chosen, True
    elif tool_choice in (None, "auto", "required"):
        required = tool_choice == "required"
    else:
        raise ToolsRefused(f"tool_choice {tool_choice!r} is not none, auto, required or a function")
    call = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
             "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    calls = {"type": "array", "items": call[0] if len(call) == 1 else {"anyOf": call}, "minItems": 1}
    if parallel is False:
        calls["maxItems"] = 1
    with_calls = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                  "additionalProperties": False}
    schema = with_calls if required else {"anyOf": [with_calls, {
        "type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
        "additionalProperties": False}]}
    listed = json.dumps([{"type": "function", "function": f} for f in functions], ensure_ascii=False)
    system = (f"You can call any of the following tools to satisfy the user's requests: {listed}\n\n"
              f"{INSTRUCTION}")
    return ToolPlan(system, grammar_for_schema(schema))


def _function(tool: Any, index: int) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ToolsRefused(f"{where} is not {{\"type\": \"function\", \"function\": {{...}}}}")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ToolsRefused(f"{where} has no function name")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise ToolsRefused(f"{where}'s parameters are not a JSON schema object")
    checked_schema(parameters, f"{where}.function.parameters")  # here, its errors name the tool's own places
    described = {"name": name, "parameters": parameters}
    if isinstance(function.get("description"), str):
        described["description"] = function["description"]
    return described


def as_text(role: str, content: str, tool_calls: list[Any] | None, name: str | None) -> tuple[str, str]:
    """A message of a tool conversation as the (role, text) the chat template takes: an assistant's
    calls as the JSON it was made to write, a tool's result as a user turn holding it."""
    if role == "tool":
        return "user", json.dumps({"tool_response": {"tool": name or "", "content": content}}, ensure_ascii=False)
    if role == "assistant" and tool_calls:
        calls = []
        for call in tool_calls:
            function = call.get("function", {}) if isinstance(call, dict) else {}
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except (TypeError, ValueError):
                raise ToolsRefused("a tool call's arguments are not a JSON string") from None
            calls.append({"name": function.get("name", ""), "arguments": arguments})
        return "assistant", json.dumps({"tool_calls": calls}, ensure_ascii=False)
    return role, content

"""Structured output: a JSON schema, "any JSON object", or a GBNF grammar, as a llama.cpp grammar.

The grammar goes into llama.cpp's grammar sampler (gemmachat/engine.py), which allows only the
tokens that keep the output inside the language: the reply parses, and matches the schema,
whatever the temperature. Schemas are converted by llama-cpp-python's SchemaConverter (a port
of llama.cpp's json-schema-to-grammar). That converter skips what it does not know, which would
let an ignored constraint through as a valid-looking reply: so every keyword is checked here
first, and one it cannot enforce is refused by name. Schemas and grammars are untrusted input:
their size and depth are bounded before any conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemmachat.errors import UserError

# Keywords the converter enforces, and annotations that constrain nothing.
# (Not allOf: the converter merges only its parts' properties, passing over their other constraints.)
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
            "maxItems", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions", "pattern",
            "format", "minLength", "maxLength"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "strict"}
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
MAX_DEPTH = 32
MAX_NODES = 5_000
MAX_GRAMMAR_BYTES = 256 * 1024

# Any JSON object (OpenAI's response_format {"type": "json_object"}).
JSON_OBJECT_SCHEMA: dict = {"type": "object"}
# Any JSON value, spelled so that the converter makes it so (it reads {} as any object).
ANY_VALUE: dict = {"type": ["object", "array", "string", "number", "boolean", "null"]}

# llama-cpp-python's converter lets any character but '"' and '\\' into a string, and any but a
# line break match a pattern's '.': raw control characters (a tab, a newline) that no JSON parser
# accepts. llama.cpp's own converter excludes them from strings; so does ours, in both places.
_LOOSE_CHAR = '[^"\\\\]'
_LOOSE_DOT = '[^\\x0A\\x0D]'
_JSON_STRING_CHAR = '[^"\\\\\\x7F\\x00-\\x1F]'


class SchemaRefused(UserError):
    """A schema or grammar that cannot be enforced; the server answers 400 with it."""


def grammar_for_schema(schema: object) -> str:
    """The GBNF grammar whose sentences are the JSON documents valid under `schema`."""
    schema = checked_schema(schema)
    import gemmachat.bindings  # noqa: F401  first: llama-cpp-python's C bindings alone, not its whole package
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(schema, "schema")
        converter.visit(resolved, "")
        grammar = _strict_strings(converter.format_grammar())
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError) as error:
        raise SchemaRefused(f"the JSON schema cannot be turned into a grammar: {error}") from None
    return check_grammar(grammar)


def _strict_strings(grammar: str) -> str:
    """The converter's grammar with JSON's rule for a string's characters, wherever it put its own."""
    rules = []
    for line in grammar.splitlines():
        name, _, body = line.partition(" ::= ")
        if name == "char":
            if not body.startswith(_LOOSE_CHAR + " "):
                raise AssertionError(f"the converter's string rule changed: {body}")
            body = _JSON_STRING_CHAR + body[len(_LOOSE_CHAR):]
        rules.append(f"{name} ::= {body.replace(_LOOSE_DOT, _JSON_STRING_CHAR)}" if body else line)
    return "\n".join(rules) + "\n"


def check_grammar(grammar: str) -> str:
    if not grammar.strip():
        raise SchemaRefused("the grammar is empty")
    if len(grammar.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
        raise SchemaRefused(f"the grammar is over {MAX_GRAMMAR_BYTES // 1024} KiB")
    return grammar


def checked_schema(schema: object, root: str = "#") -> object:
    """`schema` as the converter can take it, or SchemaRefused: any keyword it would silently skip
    is refused by name, size and depth are bounded, and what constrains nothing (a `true` schema,
    one of annotations only) becomes `{}`, which the converter reads as any object: a narrower
    language than "anything", whose every sentence is valid. Messages name places from `root`."""
    nodes = 0

    def walk(node: object, where: str, depth: int) -> object:
        nonlocal nodes
        nodes += 1
        if depth > MAX_DEPTH:
            raise SchemaRefused(f"the JSON schema nests deeper than {MAX_DEPTH} levels (at {where})")
        if nodes > MAX_NODES:
            raise SchemaRefused(f"the JSON schema has more than {MAX_NODES} parts")
        if node is True:
            return {}
        if node is False:
            raise SchemaRefused(f"the JSON schema at {where} is false, which no value matches")
        if not isinstance(node, dict):
            raise SchemaRefused(f"the JSON schema at {where} must be an object, not {type(node).__name__}")
        for key, value in node.items():
            if key not in ENFORCED and key not in ANNOTATIONS:
                raise SchemaRefused(f"the JSON schema keyword '{key}' (at {where}) is not supported: "
                                    "it could not be enforced")
        if all(key in ANNOTATIONS for key in node):
            return {}
        node = dict(node)
        for key, value in node.items():
            if key == "type":
                kinds = value if isinstance(value, list) else [value]
                if not kinds or any(kind not in TYPES for kind in kinds):
                    raise SchemaRefused(f"unknown type {value!r} at {where}")
            elif key == "format" and value not in FORMATS:
                raise SchemaRefused(f"the string format {value!r} (at {where}) is not supported "
                                    f"(supported: {', '.join(sorted(FORMATS))})")
            elif key in ("properties", "$defs", "definitions"):
                if not isinstance(value, dict):
                    raise SchemaRefused(f"'{key}' at {where} must be an object")
                node[key] = {name: walk(sub, f"{where}/{key}/{name}", depth + 1) for name, sub in value.items()}
            elif key in ("anyOf", "oneOf", "prefixItems"):
                if not isinstance(value, list) or not value:
                    raise SchemaRefused(f"'{key}' at {where} must be a non-empty list")
                node[key] = [walk(sub, f"{where}/{key}/{index}", depth + 1) for index, sub in enumerate(value)]
            elif key == "items" and value is False:  # no items past prefixItems: the converter's own case
                if "prefixItems" not in node:
                    raise SchemaRefused(f"'items': false (at {where}) is supported beside 'prefixItems' only")
            elif key == "items":
                # {} is any value here, and the converter, reading {} as "no items", would fail.
                node[key] = walk(value, f"{where}/{key}", depth + 1) or ANY_VALUE
            elif key == "additionalProperties" and not isinstance(value, bool):
                node[key] = walk(value, f"{where}/{key}", depth + 1)
            elif key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
                raise SchemaRefused(f"only local $ref ('#/...') are supported, not {value!r}")
            elif key == "enum" and (not isinstance(value, list) or not value):
                raise SchemaRefused(f"'enum' at {where} must be a non-empty list")
            if key == "prefixItems" and node.get("items", False) is False and isinstance(value, list) and not (
                    node.get("minItems", 0) <= len(value) <= node.get("maxItems", len(value))):
                raise SchemaRefused(f"'minItems'/'maxItems' at {where} do not allow the {len(value)} prefixItems")
            if key in ("enum", "const") and "type" in node:
                values = value if key == "enum" else [value]
                if any(_json_type(item) not in _allowed_types(node["type"]) for item in values):
                    raise SchemaRefused(f"'{key}' at {where} holds a value that is not of type {node['type']!r}")
        used = _used_by_converter(node)
        for key, value in node.items():
            # additionalProperties: true is JSON Schema's default; it constrains nothing to enforce.
            if (key in ENFORCED and key not in used and key not in ("$defs", "definitions")
                    and not (key == "additionalProperties" and value is True)):
                raise SchemaRefused(f"the JSON schema keyword '{key}' (at {where}) is not supported beside "
                                    f"{', '.join(sorted(used)) or 'nothing'}: it could not be enforced")
        return node

    return walk(schema, root, 0)


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object", type(None): "null"}.get(type(value), "?")


def _allowed_types(kind: object) -> set[str]:
    kinds = set(kind) if isinstance(kind, list) else {kind}
    return kinds | {"integer"} if "number" in kinds else kinds


def _used_by_converter(node: dict) -> set[str]:
    """The constraint keywords SchemaConverter.visit enforces for this node: it takes the first of
    its branches that applies and passes over the rest, in this order."""
    kind = node.get("type")
    if "$ref" in node:
        return {"$ref"}
    if "oneOf" in node or "anyOf" in node:
        return {"oneOf"} if "oneOf" in node else {"anyOf"}
    if isinstance(kind, list):
        return {"type"}
    if "const" in node or "enum" in node:  # a "type" beside them must hold of every value (checked)
        return {"const" if "const" in node else "enum", "type"}
    if kind in (None, "object") and ("properties" in node or node.get("additionalProperties", True) is not True):
        return {"type", "properties", "required", "additionalProperties"}
    if kind in (None, "array") and node.get("items", False) is not False:
        return {"type", "items"} | (set() if isinstance(node["items"], list) else {"minItems", "maxItems"})
    if kind in (None, "array") and "prefixItems" in node:  # exactly one item each: bounds must allow that (checked)
        return {"type", "prefixItems", "minItems", "maxItems"} | ({"items"} if "items" in node else set())
    if kind in (None, "string") and "pattern" in node:
        return {"type", "pattern"}
    if node.get("format") in FORMATS and (kind == "string" or (kind is None and node["format"].startswith("uuid"))):
        return {"type", "format"}
    if kind == "string":
        return {"type", "minLength", "maxLength"}
    return {"type"}


def grammar_from_flags(json_schema: str | None, grammar: str | None, grammar_file: Path | None) -> str | None:
    """The grammar --json-schema SCHEMA|@FILE, --grammar GBNF or --grammar-file FILE asks for."""
    given = [flag for flag, value in (("--json-schema", json_schema), ("--grammar", grammar),
                                      ("--grammar-file", grammar_file)) if value]
    if len(given) > 1:
        raise UserError(f"give one of {', '.join(given)}")
    if grammar_file:
        grammar = _read(grammar_file, "--grammar-file")
    if grammar:
        return check_grammar(grammar)
    if not json_schema:
        return None
    text = _read(Path(json_schema[1:]), "--json-schema") if json_schema.startswith("@") else json_schema
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise UserError(f"--json-schema is not valid JSON: {str(error).splitlines()[0]}") from None
    return grammar_for_schema(schema)


def _read(path: Path, flag: str) -> str:
    from gemmachat.safe_io import read_file

    data = read_file(path, MAX_GRAMMAR_BYTES, "a schema or grammar may be", name=flag)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path} is not UTF-8 text") from None

"""Prompt templates: (system prompt, messages) to the exact text and tokens the model sees.

Rendering keeps track of which text came from the template (trusted: its special tokens such as
<start_of_turn> become control tokens) and which came from people (untrusted: the same strings
stay plain text, unless --special). Without that split, a user could close their own turn and
write the model's.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol, Sequence

from gemmachat.errors import PromptTooLong, UserError
from gemmachat.safe_io import read_file

ROLE_NAMES = {"user": "user", "assistant": "model", "model": "model", "system": "system"}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# Candidates for special tokens in template text; the vocabulary decides which really are.
_SPECIAL_CANDIDATE = re.compile(r"<[^<>\s]{1,64}>")
TEMPLATE_LIMIT = 1 << 20


@dataclass(frozen=True)
class Message:
    role: str  # "user", "assistant" or "system"
    content: str
    # The tokens the model generated for this message, when it wrote it: replaying them keeps
    # the prompt identical to what the KV cache holds, where re-tokenizing the text may not.
    tokens: tuple[int, ...] | None = None
    interrupted: bool = False  # a reply cut short by the user


def messages_of(system: str | None, messages: Sequence[Message]) -> list[dict[str, str]]:
    """The conversation as OpenAI's (and Jinja chat templates') messages: the system prompt first."""
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": message.role, "content": message.content} for message in messages]


@dataclass(frozen=True)
class Segment:
    text: str
    trusted: bool  # written by the template, so its special-token strings are tokens
    tokens: tuple[int, ...] | None = None  # known tokens for this text (a generated reply)


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str
    history: str
    first_user: str | None = None  # how the system prompt joins the first message
    trim: bool = False
    description: str = ""


# (system prompt, messages, add_generation_prompt) -> segments
Renderer = Callable[[str | None, Sequence[Message], bool], list[Segment]]


class Tokenizer(Protocol):
    bos: int
    add_bos: bool
    n_ctx: int

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False,
                 limit: int | None = None) -> list[int]: ...

    def special_token(self, text: str) -> int | None: ...


def builtin_names() -> list[str]:
    folder = resources.files("gemmachat.builtin_templates")
    return sorted(entry.name.removesuffix(".toml") for entry in folder.iterdir()
                  if entry.name.endswith(".toml"))


def load_template(name_or_path: str) -> Template:
    """A built-in template by name, or a .toml file by path."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        try:
            source = read_file(path, TEMPLATE_LIMIT, "a template may be", name="template").decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"cannot read template {path}: it is not UTF-8") from None
        name = path.stem
    else:
        if name_or_path not in builtin_names():
            raise UserError(f"unknown template {name_or_path!r}; built in: {', '.join(builtin_names())}")
        source = resources.files("gemmachat.builtin_templates").joinpath(f"{name_or_path}.toml").read_text("utf-8")
        name = name_or_path
    try:
        fields = tomllib.loads(source)
        template = Template(
            name=name,
            prompt=str(fields["prompt"]),
            history=str(fields["history"]),
            first_user=str(fields["first_user"]) if "first_user" in fields else None,
            trim=bool(fields.get("trim", False)),
            description=str(fields.get("description", "")),
        )
    except (tomllib.TOMLDecodeError, KeyError) as error:
        raise UserError(f"template {name_or_path} is malformed: {error}") from None
    except RecursionError:  # x = [[[... 50,000 deep
        raise UserError(f"template {name_or_path} is malformed: nested too deeply") from None
    if "{{history}}" not in template.prompt:
        raise UserError(f"template {name_or_path}: `prompt` must contain {{{{history}}}}")
    return template


def render(template: Template, system: str | None, messages: Sequence[Message],
           add_generation_prompt: bool = True) -> list[Segment]:
    """The prompt as segments; their texts joined are the exact prompt text (without <bos>)."""
    history: list[Segment] = []
    pending_system = system if template.first_user is not None else None
    for message in messages:
        content = message.content.strip() if template.trim else message.content
        name = ROLE_NAMES.get(message.role)
        if name is None:
            raise UserError(f"unknown role {message.role!r} (use user, assistant or system)")
        # The official template joins the system prompt to the first message whatever its role
        # (`loop.first`), so it survives /forget or manual mode opening with another role.
        if pending_system:
            assert template.first_user is not None
            content_segments = _fill(template.first_user, {"prompt": pending_system, "message": content})
            pending_system = None
        elif message.tokens is not None:
            content_segments = [Segment(message.content, False, message.tokens)]
        else:
            content_segments = [Segment(content, False)]
        history += _fill(template.history, {"name": name, "message": content_segments})
    # Without the generation prompt, the conversation stops where the history does.
    layout = template.prompt if add_generation_prompt else template.prompt.partition("{{history}}")[0] + "{{history}}"
    values: dict[str, str | list[Segment]] = {"history": history, "char": "model"}
    values["prompt"] = (system or "") if template.first_user is None else ""
    return _merge(_fill(layout, values))


def _fill(text: str, values: dict[str, str | list[Segment]]) -> list[Segment]:
    # Template text is trusted; what fills a placeholder keeps its own trust (a role name we
    # chose is trusted, people's text is not).
    trusted_values = {"name", "char"}
    segments: list[Segment] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        segments.append(Segment(text[position:match.start()], True))
        value = values.get(match.group(1), "")
        if isinstance(value, list):
            segments += value
        else:
            segments.append(Segment(value, match.group(1) in trusted_values))
        position = match.end()
    segments.append(Segment(text[position:], True))
    return [segment for segment in segments if segment.text]


def _merge(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        mergeable = merged and merged[-1].tokens is None and segment.tokens is None
        if mergeable and merged[-1].trusted == segment.trusted:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.trusted)
        else:
            merged.append(segment)
    return merged


def prompt_text(segments: Sequence[Segment]) -> str:
    return "".join(segment.text for segment in segments)


def to_tokens(tokenizer: Tokenizer, segments: Sequence[Segment], special: bool = False,
              add_bos: bool = True, limit: int | None = None) -> list[int]:
    """Tokens for rendered segments: exactly one <bos>, special tokens only where trusted.

    Text between special tokens is tokenized as one piece whatever its trust, as llama.cpp does
    for a whole prompt, so that our tokens equal llama.cpp's for the same text. More than `limit`
    tokens (default: the whole context) raise PromptTooLong, before the rest is tokenized.
    """
    limit = tokenizer.n_ctx if limit is None else limit
    tokens = [tokenizer.bos] if add_bos and tokenizer.add_bos else []
    raw = ""

    def flush() -> None:
        nonlocal raw
        if raw:
            try:
                tokens.extend(tokenizer.tokenize(raw, limit=max(0, limit - len(tokens))))
            except PromptTooLong:
                raise PromptTooLong(f"the prompt is more than {limit} tokens, more than the context holds") from None
            raw = ""

    for segment in segments:
        if segment.tokens is not None:
            flush()
            tokens += segment.tokens
            continue
        if not (segment.trusted or special):
            raw += segment.text
            continue
        position = 0
        for match in _SPECIAL_CANDIDATE.finditer(segment.text):
            token = tokenizer.special_token(match.group(0))
            if token is None:
                continue
            raw += segment.text[position:match.start()]
            flush()
            tokens.append(token)
            position = match.end()
        raw += segment.text[position:]
    flush()
    if len(tokens) > limit:  # replayed replies and special tokens count too
        raise PromptTooLong(f"the prompt is {len(tokens)} tokens, more than the {limit} the context holds")
    return tokens


def make_renderer(template: Template, jinja: bool, model_template: str | None, *, bos_token: str,
                  eos_token: str, warn: Callable[[str], None]) -> Renderer:
    """The renderer the settings ask for: ours, or with --jinja the model's own template.

    A model template that is missing or refused falls back to ours, with one warning.
    """
    def ours(system: str | None, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        return render(template, system, messages, add_generation_prompt)

    if not jinja:
        return ours
    if not model_template:
        warn(f"the model has no chat template of its own; using the {template.name} template")
        return ours
    from gemmachat.jinja_template import TemplateRefused, render_jinja

    def theirs(system: str | None, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        nonlocal model_template
        if model_template is not None:
            try:
                return render_jinja(model_template, system, messages, bos_token=bos_token,
                                    eos_token=eos_token, add_generation_prompt=add_generation_prompt)
            except TemplateRefused as refusal:
                warn(f"the model's chat template was refused ({refusal}); using the {template.name} template")
                model_template = None
        return ours(system, messages, add_generation_prompt)

    return theirs

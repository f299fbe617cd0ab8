"""A GGUF's own chat template (`--jinja`), rendered in Jinja's immutable sandbox.

The template comes from the model file, so it is untrusted code: CVE-2024-34359 was a GGUF whose
template reached Python objects through an unsandboxed Jinja. A template the sandbox refuses, or
one that fails, is reported and the built-in Gemma template is used instead.
"""

from __future__ import annotations

from typing import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemmachat.templates import Message, Segment, messages_of


class TemplateRefused(Exception):
    """The GGUF's template could not be rendered safely; str() says why, in one line."""


def _raise_exception(message: str) -> None:
    raise TemplateRefused(f"the template raised: {message}")


def render_jinja(source: str, system: str | None, messages: Sequence[Message], *, bos_token: str,
                 eos_token: str, add_generation_prompt: bool = True) -> list[Segment]:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                undefined=jinja2.StrictUndefined)
    environment.globals["raise_exception"] = _raise_exception
    chat = messages_of(system, messages)
    try:
        text = environment.from_string(source).render(
            messages=chat, bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except TemplateRefused:
        raise
    except jinja2.exceptions.SecurityError as error:
        raise TemplateRefused(f"the sandbox refused it: {error}") from None
    except Exception as error:  # any failure of untrusted code is a refusal, not a crash
        raise TemplateRefused(f"{type(error).__name__}: {error}") from None
    # <bos> is the tokenizer's job; a template that writes it too would give two.
    if bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    return _mark_untrusted(text, [m["content"] for m in chat])


def _mark_untrusted(text: str, contents: list[str]) -> list[Segment]:
    # People's text must not become special tokens. We find each message's (possibly trimmed)
    # content in the output, in order, and mark it untrusted; the rest is the template's.
    segments: list[Segment] = []
    position = 0
    for content in contents:
        needle = content.strip()
        if not needle:
            continue
        found = text.find(needle, position)
        if found < 0:
            continue
        if found > position:
            segments.append(Segment(text[position:found], True))
        segments.append(Segment(needle, False))
        position = found + len(needle)
    if position < len(text):
        segments.append(Segment(text[position:], True))
    return segments

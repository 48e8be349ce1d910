"""Raw records to (prompt, chosen, rejected) text, for each supported layout.

- ``hh``: two full transcripts; the prompt is the shared prefix up to the final ``\\n\\nAssistant:``.
- ``plain``: three strings.
- ``chat``: ``chosen`` / ``rejected`` as lists of ``{role, content}``; the prompt is the conversation before the
  final message (or the ``prompt`` field: messages or a string), rendered by a chat template.

Each function returns an :class:`Example`, a :class:`Drop` (a well-formed record that cannot make a pair: counted,
never an error) or a :class:`Bad` (a malformed record: an error, or counted under ``on_bad_record: skip``). A text
that cannot be encoded as UTF-8 (a lone surrogate from a JSON ``"\\ud800"`` escape) is malformed: no tokenizer
takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gatedpo_mega.data.sources import Bad

HH_ASSISTANT = "\n\nAssistant:"
Messages = list[dict[str, str]]
Render = Callable[[Messages], str]  # conversation -> prompt text ending in the assistant's turn header


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str


@dataclass(frozen=True, slots=True)
class Fields:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _missing(loc: str, field: str, rec: dict[str, Any], key: str) -> Bad:
    present = ", ".join(sorted(map(str, rec))[:8]) or "none"
    return Bad(
        "missing_field",
        f"{loc}: missing field '{field}' (set data.{key}_field to your name for it; fields present: {present})",
    )


def _wrong(loc: str, field: str, expected: str, v: Any) -> Bad:
    return Bad("wrong_type", f"{loc}: field '{field}' must be {expected}, got {_type(v)}")


def _invalid_text(loc: str, field: str, v: str) -> Bad | None:
    """A lone surrogate (JSON decodes a lone ``\\ud800`` escape into one) has no UTF-8 form."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        return Bad(
            "invalid_unicode",
            f"{loc}: field '{field}' holds a lone surrogate (invalid unicode) at character {e.start}",
        )
    return None


def _texts(loc: str, expected: str, values: tuple[tuple[str, Any], ...]) -> Bad | None:
    """The first field that is not a string, or not valid unicode."""
    for name, v in values:
        if not isinstance(v, str):
            return _wrong(loc, name, expected, v)
        bad = _invalid_text(loc, name, v)
        if bad is not None:
            return bad
    return None


def split_hh(transcript: str) -> tuple[str, str] | None:
    """``(prompt, response)`` at the final assistant turn, the prompt ending in ``\\n\\nAssistant:``."""
    i = transcript.rfind(HH_ASSISTANT)
    if i < 0:
        return None
    cut = i + len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def to_example(
    loc: str, rec: dict[str, Any], *, fmt: str, fields: Fields, render: Render | None
) -> Example | Drop | Bad:
    for key in ("chosen", "rejected"):
        name = getattr(fields, key)
        if name not in rec:
            return _missing(loc, name, rec, key)
    chosen, rejected = rec[fields.chosen], rec[fields.rejected]
    has_prompt = fields.prompt in rec and rec[fields.prompt] is not None
    if fmt == "auto":
        if isinstance(chosen, list):
            fmt = "chat"
        elif isinstance(chosen, str):
            fmt = "plain" if has_prompt else "hh"
        else:
            return _wrong(loc, fields.chosen, "a string or a list of {role, content} messages", chosen)
    if fmt == "hh":
        return _hh(loc, chosen, rejected, fields)
    if fmt == "plain":
        if not has_prompt:
            return _missing(loc, fields.prompt, rec, "prompt")
        return _plain(loc, rec[fields.prompt], chosen, rejected, fields)
    assert render is not None, "chat records need a chat template"
    return _chat(loc, rec.get(fields.prompt), chosen, rejected, fields, render)


def _hh(loc: str, chosen: Any, rejected: Any, fields: Fields) -> Example | Drop | Bad:
    bad = _texts(loc, "a transcript string", ((fields.chosen, chosen), (fields.rejected, rejected)))
    if bad is not None:
        return bad
    c, r = split_hh(chosen), split_hh(rejected)
    if c is None or r is None:
        name = fields.chosen if c is None else fields.rejected
        return Bad("no_assistant_turn", f"{loc}: field '{name}' has no '\\n\\nAssistant:' turn")
    if c[0] != r[0]:
        return Drop("prompt_mismatch")
    if not c[1].strip() or not r[1].strip():
        return Drop("empty_response")
    return Example(c[0], c[1], r[1])


def _plain(loc: str, prompt: Any, chosen: Any, rejected: Any, fields: Fields) -> Example | Drop | Bad:
    bad = _texts(
        loc, "a string", ((fields.prompt, prompt), (fields.chosen, chosen), (fields.rejected, rejected))
    )
    if bad is not None:
        return bad
    if not chosen.strip() or not rejected.strip():
        return Drop("empty_response")
    return Example(prompt, chosen, rejected)


def _messages(loc: str, field: str, v: Any) -> Messages | Bad:
    if not isinstance(v, list):
        return _wrong(loc, field, "a list of {role, content} messages", v)
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            return _wrong(loc, f"{field}[{i}]", "a {role, content} message", m)
        bad = _texts(loc, "a string", tuple((f"{field}[{i}].{k}", m.get(k)) for k in ("role", "content")))
        if bad is not None:
            return bad
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _chat(
    loc: str, prompt: Any, chosen: Any, rejected: Any, fields: Fields, render: Render
) -> Example | Drop | Bad:
    c = _messages(loc, fields.chosen, chosen)
    if isinstance(c, Bad):
        return c
    r = _messages(loc, fields.rejected, rejected)
    if isinstance(r, Bad):
        return r
    if not c or not r:
        return Drop("empty_response")
    for name, msgs in ((fields.chosen, c), (fields.rejected, r)):
        if msgs[-1]["role"] != "assistant":
            return Bad("wrong_type", f"{loc}: field '{name}': the final message's role must be 'assistant'")
    if c[:-1] != r[:-1]:
        return Drop("prompt_mismatch")
    conversation = c[:-1]
    if not conversation and prompt is not None:
        if isinstance(prompt, str):
            bad = _invalid_text(loc, fields.prompt, prompt)
            if bad is not None:
                return bad
            conversation = [{"role": "user", "content": prompt}]
        else:
            p = _messages(loc, fields.prompt, prompt)
            if isinstance(p, Bad):
                if p.reason != "wrong_type":
                    return p
                return Bad("wrong_type", p.message.replace("a list of", "a string or a list of"))
            conversation = p
    if not c[-1]["content"].strip() or not r[-1]["content"].strip():
        return Drop("empty_response")
    lead = " " if render is render_hh else ""  # HH puts a space after "Assistant:"
    return Example(render(conversation), lead + c[-1]["content"], lead + r[-1]["content"])


# ---------------------------------------------------------------------------------------------------------------
# Built-in chat templates (the tokenizer's own is used where it has one and data.chat_template allows it)


def render_hh(conversation: Messages) -> str:
    """HH-RLHF style: ``\\n\\nHuman: ...\\n\\nAssistant: ...``, ending in the open assistant turn."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    turns = "".join(f"\n\n{names.get(m['role'], m['role'].title())}: {m['content']}" for m in conversation)
    return turns + HH_ASSISTANT


def render_chatml(conversation: Messages) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conversation)
    return turns + "<|im_start|>assistant\n"


BUILTIN_TEMPLATES: dict[str, Render] = {"hh": render_hh, "chatml": render_chatml}

"""Conversation templates: how a normalised conversation becomes model text, and which of it is learned.

A template renders a conversation (the `conversation` row of formats.py) into ordered
segments `(text, learned)`. Exactly the assistant turns are learned: each one's content
plus the family's end-of-turn token, so the model learns both to answer and to stop.
Everything else (bos, system prompt, user and tool turns, role headers, the newline
after an end-of-turn token) is context only. Named templates are data, one
`ConversationTemplate` per model family; with no name we use the tokenizer's own Jinja
`chat_template`, cutting its renderings of growing prefixes of the conversation into the
same segments. `render_prompt` gives the matching generation prompt, so training and
inference see the same text. Tool definitions (the row's `tools`) go to the chat
template's `tools` argument when it reads one, otherwise they are appended to the system
prompt so the model still sees them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lmflow_ray.errors import UserError

Segment = tuple[str, bool]


@dataclass(frozen=True)
class ConversationTemplate:
    """One family's chat format.

    Turn formats hold `{content}` once; `{bos}`/`{eos}` stand for the tokenizer's own
    tokens, for families whose format is written in terms of them.
    """

    name: str
    user: str
    tool: str
    assistant: str  # header before an assistant turn; also the generation prompt
    end_of_turn: str  # learned right after the assistant content
    after_turn: str = ""  # not learned: what separates an ended turn from the next one
    start: str = ""  # once, before everything
    system: str = "{content}"
    system_in_first_user: bool = False  # families without a system role fold it into the first user turn
    default_system: str = ""


def _chatml(name: str, default_system: str = "") -> ConversationTemplate:
    return ConversationTemplate(
        name=name,
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        tool="<|im_start|>tool\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
        after_turn="\n",
        default_system=default_system,
    )


def _header_family(name: str, end: str) -> ConversationTemplate:
    """Zephyr and Phi-3: `<|role|>\\n` headers, each turn closed by `end` and a newline."""
    return ConversationTemplate(
        name=name,
        system="<|system|>\n{content}" + end + "\n",
        user="<|user|>\n{content}" + end + "\n",
        tool="<|tool|>\n{content}" + end + "\n",
        assistant="<|assistant|>\n",
        end_of_turn=end,
        after_turn="\n",
    )


def _llama3_turn(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{{content}}<|eot_id|>"


_TEMPLATE_LIST = [
    _chatml("chatml"),
    _chatml("qwen2", default_system="You are a helpful assistant."),
    ConversationTemplate(
        name="llama3",
        start="<|begin_of_text|>",
        system=_llama3_turn("system"),
        user=_llama3_turn("user"),
        tool=_llama3_turn("ipython"),  # Llama 3.1's role for tool results
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
    ),
    # Meta's reference puts a space before eos; we drop it so the learned text is content + eos.
    ConversationTemplate(
        name="llama2",
        system="<<SYS>>\n{content}\n<</SYS>>\n\n",
        system_in_first_user=True,
        user="{bos}[INST] {content} [/INST]",
        tool="{bos}[INST] {content} [/INST]",
        assistant=" ",
        end_of_turn="{eos}",
    ),
    _header_family("zephyr", "</s>"),
    _header_family("phi3", "<|end|>"),
    ConversationTemplate(
        name="gemma",
        start="<bos>",
        system="{content}\n\n",
        system_in_first_user=True,
        user="<start_of_turn>user\n{content}<end_of_turn>\n",
        tool="<start_of_turn>tool\n{content}<end_of_turn>\n",
        assistant="<start_of_turn>model\n",
        end_of_turn="<end_of_turn>",
        after_turn="\n",
    ),
    ConversationTemplate(
        name="deepseek",
        start="{bos}",
        system="{content}\n\n",
        user="User: {content}\n\n",
        tool="Tool: {content}\n\n",
        assistant="Assistant: ",
        end_of_turn="{eos}",
    ),
    ConversationTemplate(name="empty", start="{bos}", user="{content}", tool="{content}", assistant="",
                         end_of_turn="{eos}"),
    ConversationTemplate(name="empty_no_special_tokens", user="{content}", tool="{content}", assistant="",
                         end_of_turn=""),
]
TEMPLATES: dict[str, ConversationTemplate] = {t.name: t for t in _TEMPLATE_LIST}

# End-of-turn tokens we recognise after assistant content in a tokenizer's own chat template,
# for tokenizers whose eos is not the turn end (e.g. Gemma's eos is <eos>, turns end with <end_of_turn>).
_KNOWN_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


def _fill(fmt: str, tokenizer) -> str:
    return fmt.replace("{bos}", tokenizer.bos_token or "").replace("{eos}", tokenizer.eos_token or "")


def _wrap(fmt: str, content: str, tokenizer) -> str:
    # Split before inserting, so braces inside user content are never read as placeholders.
    head, _, tail = _fill(fmt, tokenizer).partition("{content}")
    return head + content + tail


def _merge(segments: list[Segment]) -> list[Segment]:
    """Drop empty segments and join neighbours with the same flag, so text tokenizes as one piece."""
    out: list[Segment] = []
    for text, learned in segments:
        if not text:
            continue
        if out and out[-1][1] == learned:
            out[-1] = (out[-1][0] + text, learned)
        else:
            out.append((text, learned))
    return out


def _system_with_tools(system: str, tools: str) -> str:
    return "\n\n".join(part for part in (system, tools) if part)


def _named_segments(conv: dict, t: ConversationTemplate, tokenizer) -> list[Segment]:
    system = _system_with_tools(conv.get("system") or t.default_system, conv.get("tools") or "")
    messages = list(conv["messages"])
    segments: list[Segment] = [(_fill(t.start, tokenizer), False)]
    if system and t.system_in_first_user and messages:
        messages[0] = {**messages[0], "content": _wrap(t.system, system, tokenizer) + messages[0]["content"]}
    elif system:
        segments.append((_wrap(t.system, system, tokenizer), False))
    for m in messages:
        if m["role"] == "assistant":
            segments += [(_fill(t.assistant, tokenizer), False),
                         (m["content"] + _fill(t.end_of_turn, tokenizer), True),
                         (_fill(t.after_turn, tokenizer), False)]
        else:
            segments.append((_wrap(t.tool if m["role"] == "tool" else t.user, m["content"], tokenizer), False))
    return segments


def _template_inputs(conv: dict, tokenizer) -> tuple[list[dict], dict]:
    """Messages (system first) and extra kwargs for the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' has no chat_template; "
            f"set a conversation template by name (one of {', '.join(TEMPLATES)})"
        )
    tools, kwargs = conv.get("tools") or "", {}
    parsed = _parse_tools(tools) if "tools" in tokenizer.chat_template else None
    if parsed is not None:
        kwargs["tools"], tools = parsed, ""
    system = _system_with_tools(conv.get("system") or "", tools)
    messages = [{"role": m["role"], "content": m["content"]} for m in conv["messages"]]
    return ([{"role": "system", "content": system}] if system else []) + messages, kwargs


def _parse_tools(tools: str) -> list | None:
    try:
        parsed = json.loads(tools) if tools else None
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


def _render(tokenizer, messages: list[dict], kwargs: dict, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         **kwargs)


def _extension(before: str, after: str, tokenizer) -> str:
    if not after.startswith(before):
        raise UserError(
            f"the chat_template of tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' is not prefix-consistent "
            "(rendering more turns rewrites earlier text), so learned tokens cannot be located; "
            f"set a conversation template by name (one of {', '.join(TEMPLATES)})"
        )
    return after[len(before):]


def _split_assistant(tail: str, content: str, tokenizer) -> list[Segment]:
    """Cut the rendering of one assistant turn into header, learned content + turn end, trailer."""
    for text in (content, content.strip()):  # some templates trim contents
        at = tail.find(text) if text else -1
        if at >= 0:
            break
    else:
        raise UserError(
            f"the chat_template of tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' does not reproduce "
            f"assistant content verbatim ({content[:40]!r}); set a conversation template by name"
        )
    rest = tail[at + len(text):]
    ends = [e for e in (tokenizer.eos_token, *_KNOWN_TURN_ENDS) if e and rest.startswith(e)]
    end = ends[0] if ends else ""
    return [(tail[:at], False), (text + end, True), (rest[len(end):], False)]


def _chat_template_segments(conv: dict, tokenizer) -> list[Segment]:
    messages, kwargs = _template_inputs(conv, tokenizer)
    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], kwargs, generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], kwargs, generation_prompt=False)
        segments.append((_extension(done, prompt, tokenizer), False))
        segments += _split_assistant(_extension(prompt, full, tokenizer), m["content"], tokenizer)
        done = full
    return segments


def _lookup(template: str) -> ConversationTemplate:
    if template not in TEMPLATES:
        raise UserError(
            f"unknown conversation template '{template}'; use one of {', '.join(TEMPLATES)}, "
            "or leave it unset to use the tokenizer's chat_template"
        )
    return TEMPLATES[template]


def render_segments(conv: dict, template: str | None, tokenizer) -> list[Segment]:
    """A normalised conversation as `(text, learned)` segments; `template=None` uses the tokenizer's own."""
    if template is None:
        return _merge(_chat_template_segments(conv, tokenizer))
    return _merge(_named_segments(conv, _lookup(template), tokenizer))


def render_prompt(messages: list[dict], system: str, template: str | None, tokenizer) -> str:
    """The text to generate from: the conversation so far, then the assistant header."""
    if messages and messages[0].get("role") == "system":
        system, messages = system or messages[0]["content"], messages[1:]
    conv = {"system": system or "", "messages": messages, "tools": ""}
    if template is None:
        full, kwargs = _template_inputs(conv, tokenizer)
        return _render(tokenizer, full, kwargs, generation_prompt=True)
    t = _lookup(template)
    return "".join(text for text, _ in _named_segments(conv, t, tokenizer)) + _fill(t.assistant, tokenizer)

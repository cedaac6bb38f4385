"""The LMFlow dataset formats: per-instance checks and normalisation to a fixed schema.

A file is `{"type": TYPE, "instances": [...]}` (or a `.jsonl` of bare instances whose
type comes from config). `check_instance` lists what is wrong with one instance as
`key: problem` strings; `normalize` turns a valid instance into a row of one fixed
shape per type, so Ray Data blocks never disagree on their schema.

Conversation rules follow LMFlow: an optional system prompt (the `system` key, or a
leading `system` message, which is moved there), then turns that start with `user` and
alternate user → assistant → user ...; `tool` turns may answer an assistant turn (tool
calls) and precede the next assistant turn. A trailing user/tool turn has no answer to
learn and is trimmed. Every turn needs non-empty content.
"""

from __future__ import annotations

import json
from typing import Any

TYPES = (
    "text_only",
    "text2text",
    "conversation",
    "paired_conversation",
    "paired_text_to_text",
    "text_to_scored_textlist",
    "image_text",
    "multiple_choice",
)

ROLES = ("user", "assistant", "tool")
# role -> roles allowed to follow it
NEXT_ROLE = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant")}


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _tname(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if _is_number(v) else type(v).__name__
    )


def _need_str(inst: dict, key: str, problems: list[str], prefix: str = "", allow_empty: bool = True) -> None:
    if key not in inst:
        problems.append(f"key '{prefix}{key}': missing (a string is required)")
    elif not _is_str(inst[key]):
        problems.append(f"key '{prefix}{key}': expected a string, got {_tname(inst[key])}")
    elif not allow_empty and not inst[key].strip():
        problems.append(f"key '{prefix}{key}': empty string")


def check_conversation(conv: Any, problems: list[str], prefix: str = "") -> None:
    if not isinstance(conv, dict):
        problems.append(f"key '{prefix.rstrip('.') or 'instance'}': expected an object, got {_tname(conv)}")
        return
    msgs = conv.get("messages")
    if "messages" not in conv:
        problems.append(f"key '{prefix}messages': missing (a list of {{role, content}} is required)")
        return
    if not isinstance(msgs, list):
        problems.append(f"key '{prefix}messages': expected an array, got {_tname(msgs)}")
        return
    if not msgs:
        problems.append(f"key '{prefix}messages': empty; a conversation needs at least one user turn")
        return
    if "system" in conv and conv["system"] is not None and not _is_str(conv["system"]):
        problems.append(f"key '{prefix}system': expected a string or null, got {_tname(conv['system'])}")
    if "tools" in conv and conv["tools"] is not None and not isinstance(conv["tools"], (list, str)):
        problems.append(f"key '{prefix}tools': expected an array or string, got {_tname(conv['tools'])}")
    prev = None
    for j, m in enumerate(msgs):
        where = f"{prefix}messages[{j}]"
        if not isinstance(m, dict):
            problems.append(f"key '{where}': expected an object with role and content, got {_tname(m)}")
            return
        role, content = m.get("role"), m.get("content")
        if not _is_str(role):
            problems.append(f"key '{where}.role': missing or not a string")
            return
        if j == 0 and role == "system":
            if conv.get("system"):
                problems.append(f"key '{where}.role': system prompt given twice (key 'system' and a system message)")
                return
            if not _is_str(content):
                problems.append(f"key '{where}.content': expected a string, got {_tname(content)}")
            continue
        if role not in ROLES:
            problems.append(f"key '{where}.role': unknown role '{role}'; use one of {', '.join(ROLES)}")
            return
        if role not in NEXT_ROLE[prev]:
            expected = " or ".join(NEXT_ROLE[prev])
            problems.append(
                f"key '{where}.role': '{role}' out of order, expected {expected}"
                + (" (conversations start with a user turn)" if prev is None else "")
            )
            return
        if not _is_str(content):
            problems.append(f"key '{where}.content': expected a string, got {_tname(content)}")
            return
        if not content.strip():
            problems.append(f"key '{where}.content': empty content")
            return
        prev = role


def check_instance(dtype: str, inst: Any) -> list[str]:
    """Problems with one instance, each as "key 'k': what is wrong"; empty when valid."""
    problems: list[str] = []
    if not isinstance(inst, dict):
        return [f"expected an object, got {_tname(inst)}"]
    if dtype == "text_only":
        _need_str(inst, "text", problems)
    elif dtype == "text2text":
        _need_str(inst, "input", problems)
        _need_str(inst, "output", problems)
    elif dtype == "conversation":
        check_conversation(inst, problems)
    elif dtype == "paired_conversation":
        for side in ("chosen", "rejected"):
            if side not in inst:
                problems.append(f"key '{side}': missing (a conversation object is required)")
            else:
                check_conversation(inst[side], problems, prefix=f"{side}.")
    elif dtype == "paired_text_to_text":
        for key in ("prompt", "chosen", "rejected"):
            _need_str(inst, key, problems)
        if "margin" in inst and inst["margin"] is not None and not _is_number(inst["margin"]):
            problems.append(f"key 'margin': expected a number, got {_tname(inst['margin'])}")
    elif dtype == "text_to_scored_textlist":
        _need_str(inst, "input", problems)
        out = inst.get("output")
        if "output" not in inst:
            problems.append("key 'output': missing (a list of {text, score} is required)")
        elif not isinstance(out, list) or not out:
            problems.append(f"key 'output': expected a non-empty array of {{text, score}}, got {_tname(out)}")
        else:
            for j, o in enumerate(out):
                if not isinstance(o, dict):
                    problems.append(f"key 'output[{j}]': expected an object, got {_tname(o)}")
                    continue
                _need_str(o, "text", problems, prefix=f"output[{j}].")
                if not _is_number(o.get("score")):
                    problems.append(f"key 'output[{j}].score': expected a number, got {_tname(o.get('score'))}")
    elif dtype == "multiple_choice":
        _need_str(inst, "input", problems)
        choices, answer = inst.get("choices"), inst.get("answer")
        if "choices" not in inst:
            problems.append("key 'choices': missing (a list of at least 2 answer texts is required)")
        elif not isinstance(choices, list) or len(choices) < 2 or not all(_is_str(c) and c for c in choices):
            problems.append(f"key 'choices': expected at least 2 non-empty strings, got {json.dumps(choices)[:80]}")
        elif "answer" not in inst:
            problems.append("key 'answer': missing (the correct choice: its text or its 0-based index)")
        elif not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)) \
                and answer not in choices:
            problems.append(f"key 'answer': {json.dumps(answer)[:60]} is not one of the {len(choices)} choices "
                            f"(give a choice's text or an index 0-{len(choices) - 1})")
    elif dtype == "image_text":
        images = inst.get("image")
        if "image" not in inst:
            problems.append("key 'image': missing (an image file path, or a list of them, is required)")
        elif not (_is_str(images) and images.strip()) and not (
                isinstance(images, list) and images and all(_is_str(x) and x.strip() for x in images)):
            problems.append(f"key 'image': expected a file path or a non-empty list of file paths, got "
                            f"{json.dumps(images)[:80]}")
        if "messages" in inst:
            check_conversation(inst, problems)
        else:
            _need_str(inst, "input", problems)
            _need_str(inst, "output", problems)
        others = [m.get("role") for m in inst.get("messages") or [] if isinstance(m, dict) and m.get("role") != "user"
                  and IMAGE_PLACEHOLDER in str(m.get("content") or "")]
        if not problems and others:
            problems.append(f"an {IMAGE_PLACEHOLDER} placeholder in a {others[0]} turn; images go in user turns")
        if not problems:
            found, wanted = image_placeholders(inst), len(image_list(inst))
            if found and found != wanted:
                where = "user turns" if "messages" in inst else "input"
                problems.append(f"{found} {IMAGE_PLACEHOLDER} placeholder(s) in the {where} for {wanted} image(s); "
                                f"put one {IMAGE_PLACEHOLDER} per image (or none: the images then go before the "
                                "first user text)")
    else:
        raise ValueError(f"unknown type {dtype}")
    return problems


IMAGE_PLACEHOLDER = "<image>"  # where an image_text instance's image goes in its text


def image_list(inst: dict) -> list[str]:
    """An image_text instance's image paths (`image` is one path or a list)."""
    images = inst["image"]
    return [images] if isinstance(images, str) else list(images)


def image_placeholders(inst: dict) -> int:
    """How many image placeholders an image_text instance's user text holds."""
    if "messages" in inst:
        return sum(str(m.get("content") or "").count(IMAGE_PLACEHOLDER) for m in inst["messages"]
                   if m.get("role") == "user")
    return str(inst.get("input") or "").count(IMAGE_PLACEHOLDER)


def _normalize_conversation(conv: dict, for_prompt: bool = False) -> dict:
    msgs = list(conv["messages"])
    system = conv.get("system") or ""
    if msgs and msgs[0].get("role") == "system":
        system = msgs[0].get("content") or ""
        msgs = msgs[1:]
    if for_prompt:
        msgs = prompt_messages({"messages": msgs})  # up to the last user turn: what to answer
    while not for_prompt and msgs and msgs[-1]["role"] != "assistant":
        msgs.pop()  # trailing user/tool turns have no answer to learn
    tools = conv.get("tools")
    return {
        "system": system,
        "messages": [{"role": m["role"], "content": m["content"]} for m in msgs],
        "tools": tools if isinstance(tools, str) else (json.dumps(tools) if tools else ""),
    }


def prompt_messages(conv: dict) -> list[dict]:
    """The prompt part of a conversation for generation: every turn up to the last user turn."""
    msgs = [m for m in conv["messages"] if m.get("role") != "system"]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    return msgs


def prompt_of(dtype: str, inst: dict):
    """What a model is asked for an instance: a message list (a conversation's system prompt, then its
    turns up to the last user turn) or the input text (text2text, text_only)."""
    if dtype == "conversation":
        system = inst.get("system") or next((m["content"] for m in inst["messages"] if m["role"] == "system"), "")
        return ([{"role": "system", "content": system}] if system else []) + prompt_messages(inst)
    return inst["input"] if dtype in ("text2text", "multiple_choice") else inst["text"]


def normalize(dtype: str, inst: dict, for_prompt: bool = False) -> dict:
    """A checked instance as a row of the fixed schema of its type.

    `for_prompt`: a conversation keeps its turns up to the last user turn (the prompt to
    answer) instead of up to the last assistant turn (what training learns from).
    """
    if dtype == "text_only":
        return {"text": inst["text"]}
    if dtype == "text2text":
        return {"input": inst["input"], "output": inst["output"]}
    if dtype == "conversation":
        return _normalize_conversation(inst, for_prompt)
    if dtype == "paired_conversation":
        c, r = _normalize_conversation(inst["chosen"]), _normalize_conversation(inst["rejected"])
        return {"chosen": c, "rejected": r}
    if dtype == "paired_text_to_text":
        m = inst.get("margin")
        return {"prompt": inst["prompt"], "chosen": inst["chosen"], "rejected": inst["rejected"],
                "margin": float(m) if m is not None else 0.0}
    if dtype == "text_to_scored_textlist":
        return {"input": inst["input"], "output": [{"text": o["text"], "score": float(o["score"])} for o in inst["output"]]}
    if dtype == "multiple_choice":
        a = inst["answer"]
        return {"input": inst["input"], "choices": list(inst["choices"]),
                "answer": a if isinstance(a, int) else inst["choices"].index(a)}
    if dtype == "image_text":
        # one shape for both forms: a conversation (input/output become a user and an assistant turn),
        # with one placeholder per image (none written: they go before the first user text)
        if "messages" in inst:
            conv = _normalize_conversation(inst, for_prompt)
        else:
            msgs = [{"role": "user", "content": inst["input"]}] + \
                ([] if for_prompt else [{"role": "assistant", "content": inst["output"]}])
            conv = {"system": "", "messages": msgs, "tools": ""}
        images = image_list(inst)
        if not image_placeholders(conv):
            msgs = list(conv["messages"])
            first = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
            if first is None:
                msgs, first = [{"role": "user", "content": ""}] + msgs, 0
            msgs[first] = {"role": "user", "content": IMAGE_PLACEHOLDER * len(images) + "\n" + msgs[first]["content"]}
            conv = {**conv, "messages": msgs}
        return {"image": images, **conv}
    raise ValueError(f"unknown type {dtype}")


def was_trimmed(dtype: str, inst: dict) -> bool:
    """True when normalisation drops a trailing user/tool turn (reported by `data validate`)."""
    if dtype in ("conversation", "image_text") and isinstance(inst.get("messages"), list) and inst["messages"]:
        return inst["messages"][-1].get("role") != "assistant"
    return False


def arrow_schema(dtype: str):
    import pyarrow as pa

    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    conv = pa.struct([("system", pa.string()), ("messages", pa.list_(msg)), ("tools", pa.string())])
    fields = {
        "text_only": [("text", pa.string())],
        "text2text": [("input", pa.string()), ("output", pa.string())],
        "conversation": [("system", pa.string()), ("messages", pa.list_(msg)), ("tools", pa.string())],
        "paired_conversation": [("chosen", conv), ("rejected", conv)],
        "paired_text_to_text": [("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                                ("margin", pa.float64())],
        "text_to_scored_textlist": [("input", pa.string()),
                                    ("output", pa.list_(pa.struct([("text", pa.string()), ("score", pa.float64())])))],
        "multiple_choice": [("input", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.int64())],
        "image_text": [("image", pa.list_(pa.string())), ("system", pa.string()), ("messages", pa.list_(msg)),
                       ("tools", pa.string())],
    }[dtype]
    return pa.schema(fields)

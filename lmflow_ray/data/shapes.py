"""Rows in the shapes people keep data in, mapped onto LMFlow instances.

A row is one record of a dataset file (a JSONL line, an element of a JSON array, a Parquet /
Arrow row). Its *shape* says how its fields read:

- `lmflow` / `hf`: the LMFlow type's own fields (`text`; `input`/`output`; `messages`; `prompt`/
  `chosen`/`rejected`; ...), as in LMFlow JSON files or a `datasets` dataset with those columns.
- `openai`: `{"messages": [{"role", "content"}...], "tools"?}` with `system`/`developer` turns,
  content-part lists and assistant `tool_calls` (rendered as one JSON object per call,
  `{"name", "arguments"}`, after the turn's text).
- `sharegpt`: `{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}]}`.
- `alpaca`: `{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}`.
- `preference`: `chosen` / `rejected` (+ `prompt`) as strings or as OpenAI message lists (TRL's
  conversational preference rows; a `chosen` list that starts with the user turn holds its prompt).

`detect` names the shape from a first row; `lmflow_type` the LMFlow type it maps onto;
`to_instance` maps one row and lists its problems in the row's own terms (its keys, its role
names), so a user can find them in their file. Pure logic: no Ray, no I/O.
"""

from __future__ import annotations

import json
from typing import Any

from lmflow_ray.config import DATA_FORMATS as FORMATS
from lmflow_ray.data.formats import TYPES, _tname

SHAPES = FORMATS[1:]

# ShareGPT speaker tags -> LMFlow roles (data.roles adds or overrides tags).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                "function": "tool"}


def detect(row: Any) -> str:
    """The shape of a (column-renamed) row; `lmflow` when none of the others fits."""
    if not isinstance(row, dict):
        return "lmflow"
    if "conversations" in row:
        return "sharegpt"
    if "image" in row:
        return "lmflow"
    if "chosen" in row and "rejected" in row and not isinstance(row["chosen"], dict):
        return "preference"
    if "messages" in row:
        return "openai"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return "lmflow"


def infer_type(row: Any) -> str | None:
    """The LMFlow type whose fields an `lmflow`/`hf` row has, or None when it is unclear."""
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if "image" in keys:
        return "image_text"
    if "messages" in keys:
        return "conversation"
    if {"chosen", "rejected"} <= keys:
        return "paired_conversation" if isinstance(row["chosen"], dict) else "paired_text_to_text"
    if {"input", "choices"} <= keys:
        return "multiple_choice"
    if {"input", "output"} <= keys:
        return "text_to_scored_textlist" if isinstance(row["output"], list) else "text2text"
    if "text" in keys:
        return "text_only"
    return None


def lmflow_type(shape: str, row: Any, declared: str | None) -> tuple[str | None, str | None]:
    """(LMFlow type, problem): the type rows of `shape` map onto, given the declared type (or None)."""
    if shape in ("lmflow", "hf"):
        t = declared or infer_type(row)
        if t is None:
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else _tname(row)
            return None, (f"cannot tell the dataset type from the fields ({keys}); declare it (data.type / --type: "
                          f"one of {', '.join(TYPES)}), its format (data.format: openai, sharegpt, alpaca, "
                          "preference) or map its columns (data.columns)")
        return t, None
    allowed = {"openai": ("conversation",), "sharegpt": ("conversation",), "alpaca": ("conversation", "text2text"),
               "preference": ("paired_conversation", "paired_text_to_text")}[shape]
    if declared is None:
        if shape == "preference":
            strings = isinstance(row, dict) and isinstance(row.get("chosen"), str)
            return ("paired_text_to_text" if strings else "paired_conversation"), None
        return allowed[0], None
    if declared not in allowed:
        return None, (f"{shape} rows map onto {' or '.join(allowed)}, not '{declared}'; "
                      "drop data.type or declare one of those")
    return declared, None


# ----------------------------------------------------------------------------- mapping


def _text(content: Any, where: str, problems: list[str]) -> str | None:
    """An OpenAI message content as text: a string, or the text parts of a content-part list."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                problems.append(f"key '{where}[{k}]': a '{kind or _tname(part)}' content part; only text parts "
                                "are read for conversation data")
                return None
        return "".join(texts)
    problems.append(f"key '{where}': expected a string or a list of text parts, got {_tname(content)}")
    return None


def _tool_calls(calls: Any, where: str, problems: list[str]) -> str:
    if not isinstance(calls, list):
        problems.append(f"key '{where}': expected an array of tool calls, got {_tname(calls)}")
        return ""
    lines = []
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            problems.append(f"key '{where}[{k}]': expected {{\"function\": {{\"name\", \"arguments\"}}}}")
            return ""
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass  # kept as the string it is
        lines.append(json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False))
    return "\n".join(lines)


def openai_turns(msgs: Any, key: str, problems: list[str]) -> Any:
    """An OpenAI message list as LMFlow turns, index for index (so LMFlow's checks name the user's
    `key[j]`): `developer` -> system, `function` -> tool, text parts joined, tool calls rendered.
    Anything else passes through for the conversation checks (formats.check_conversation)."""
    if not isinstance(msgs, list):
        return msgs
    turns = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            turns.append(m)
            continue
        role = m.get("role")
        turn = {"role": OPENAI_ROLES.get(role, role) if isinstance(role, str) else role, "content": m.get("content")}
        content = _text(m.get("content"), f"{key}[{j}].content", problems)
        if problems:
            return msgs
        if m.get("tool_calls"):
            calls = _tool_calls(m["tool_calls"], f"{key}[{j}].tool_calls", problems)
            content = f"{content}\n{calls}" if content else calls
        if content is not None:
            turn["content"] = content
        turns.append(turn)
    return turns


def _openai(row: dict, problems: list[str]) -> dict:
    out = {k: v for k, v in row.items() if k in ("system", "tools")}
    out["messages"] = openai_turns(row.get("messages"), "messages", problems)
    return out


def _sharegpt(row: dict, roles: dict[str, str], problems: list[str]) -> dict:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        problems.append(f"key 'conversations': expected a non-empty array of {{from, value}}, got {_tname(conv)}")
        return {}
    tags = {**SHAREGPT_ROLES, **roles}
    system, turns, prev_tag = row.get("system") or "", [], None
    for j, m in enumerate(conv):
        where = f"conversations[{j}]"
        if not isinstance(m, dict) or not isinstance(m.get("from"), str) or "value" not in m:
            problems.append(f"key '{where}': expected an object {{\"from\", \"value\"}}, got {json.dumps(m)[:60]}")
            return {}
        tag, value = m["from"], m["value"]
        role = tags.get(tag)
        if role is None:
            problems.append(f"key '{where}.from': unknown role '{tag}'; use one of {', '.join(tags)} "
                            f"(or map it: data.roles: {{{tag}: assistant}})")
            return {}
        if not isinstance(value, str) or not value.strip():
            problems.append(f"key '{where}.value': empty turn; give it text or remove it")
            return {}
        if role == "system":
            if turns:
                problems.append(f"key '{where}.from': a system turn after the conversation started; move it first")
                return {}
            system = value
            continue
        expected = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"),
                    "tool": ("tool", "assistant")}[turns[-1]["role"] if turns else None]
        if role not in expected:
            wanted = " or ".join(t for t, r in tags.items() if r in expected and t in SHAREGPT_ROLES)
            after = f"follows '{prev_tag}'" if prev_tag else "starts the conversation"
            problems.append(f"key '{where}.from': '{tag}' {after}; ShareGPT turns alternate human -> gpt "
                            f"(expected {wanted})")
            return {}
        turns.append({"role": role, "content": value})
        prev_tag = tag
    return {"system": system, "messages": turns, "tools": row.get("tools") or ""}


def _alpaca(row: dict, dtype: str, problems: list[str]) -> dict:
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            problems.append(f"key '{key}': expected a string, got {_tname(row.get(key)) if key in row else 'nothing'}")
    if row.get("input") is not None and not isinstance(row["input"], str):
        problems.append(f"key 'input': expected a string, got {_tname(row['input'])}")
    if problems:
        return {}
    if not row["instruction"].strip():
        problems.append("key 'instruction': empty; give the instruction text")
        return {}
    prompt = row["instruction"] + (f"\n\n{row['input']}" if (row.get("input") or "").strip() else "")
    if dtype == "text2text":
        return {"input": prompt, "output": row["output"]}
    turns = []
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        problems.append("key 'history': expected an array of [user, assistant] pairs")
        return {}
    for user, assistant in history:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return {"system": row.get("system") or "", "messages": turns, "tools": ""}


def _preference(row: dict, dtype: str, problems: list[str]) -> dict:
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if dtype == "paired_text_to_text":
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if "margin" in row:
            out["margin"] = row["margin"]
        return out
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    prompt = openai_turns(prompt, "prompt", problems) if prompt is not None else []
    sides = {}
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        turns = [{"role": "assistant", "content": value}] if isinstance(value, str) else \
            openai_turns(value, side, problems)
        if problems:
            return {}
        if not isinstance(turns, list) or not isinstance(prompt, list):
            return {side: {"messages": turns if not isinstance(turns, list) else prompt}}
        starts_with_prompt = bool(turns) and isinstance(turns[0], dict) and turns[0].get("role") in ("user", "system")
        sides[side] = {"messages": turns if starts_with_prompt else prompt + turns}
    return sides


def to_instance(shape: str, dtype: str, row: Any, roles: dict[str, str] | None = None) -> tuple[Any, list[str]]:
    """(LMFlow instance of `dtype`, problems in the row's terms); an `lmflow`/`hf` row is its own instance."""
    if shape in ("lmflow", "hf") or not isinstance(row, dict):
        return row, []
    problems: list[str] = []
    if shape == "openai":
        inst = _openai(row, problems)
    elif shape == "sharegpt":
        inst = _sharegpt(row, roles or {}, problems)
    elif shape == "alpaca":
        inst = _alpaca(row, dtype, problems)
    elif shape == "preference":
        inst = _preference(row, dtype, problems)
    else:
        raise ValueError(f"unknown shape {shape}")
    return inst, problems

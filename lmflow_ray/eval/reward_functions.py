"""Rule-based rewards: `(prompts, responses) -> list[float]`, usable wherever a reward model is.

Pass them as `--reward lmflow_ray.eval.reward_functions:json_object` (or your own
`my_rewards.py:function`). They are deterministic and cheap: good for format tasks, as
sanity checks beside a learned reward, and in tests.
"""

from __future__ import annotations

import json
import re

REFUSALS = re.compile(r"\b(i do not know|i don't know|no idea|i cannot|i can't|as an ai)\b", re.IGNORECASE)
WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset("a an the of to in on at by for and or is are was were do does did what where who how why "
                      "which that this with from be it its as".split())


def json_object(prompts: list, responses: list[str]) -> list[float]:
    """1.0 when the whole response is one JSON object (e.g. the kv2json task), else 0.0."""
    out = []
    for r in responses:
        try:
            out.append(1.0 if isinstance(json.loads(r.strip()), dict) else 0.0)
        except (json.JSONDecodeError, ValueError):
            out.append(0.0)
    return out


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt if m.get("role") == "user")


def on_topic(prompts: list, responses: list[str]) -> list[float]:
    """Share of the prompt's content words that the response uses, minus 1 for a refusal.

    In [-1, 1]: 1 = every content word of the question comes back in the answer.
    """
    out = []
    for p, r in zip(prompts, responses):
        asked = {w for w in WORD.findall(_prompt_text(p).lower()) if w not in STOPWORDS}
        said = set(WORD.findall(r.lower()))
        score = len(asked & said) / len(asked) if asked else 0.0
        out.append(score - (1.0 if REFUSALS.search(r) else 0.0))
    return out


def length_target(prompts: list, responses: list[str], target_words: int = 20) -> list[float]:
    """1 - |words - target| / target, floored at -1: prefers answers of about `target_words` words."""
    return [max(-1.0, 1.0 - abs(len(r.split()) - target_words) / target_words) for r in responses]


def letter_share(prompts: list, responses: list[str]) -> list[float]:
    """Share of a response's characters that are letters or spaces: a dense "looks like words" signal.

    In [0, 1]; meant for smoke tests of RL loops on untrained models, whose samples mix
    bytes, digits and punctuation.
    """
    return [sum(c.isalpha() or c == " " for c in r) / len(r) if r else 0.0 for r in responses]


_PAIR = re.compile(r"(\w+)\s*=\s*([^;]+)")


def kv_json(prompts: list, responses: list[str]) -> list[float]:
    """Dense reward for "Convert to JSON: k1=v1; k2=v2" prompts (the kv2json task), in [0, 1]:

    0.25 if a JSON object is found in the response (first `{` to last `}`), + 0.25 if that object is
    the whole response, + 0.5 x the share of the prompt's key=value pairs it holds with that value.
    """
    out = []
    for p, r in zip(prompts, responses):
        text = r.strip()
        start, end = text.find("{"), text.rfind("}")
        try:
            obj = json.loads(text[start:end + 1]) if 0 <= start < end else None
        except (json.JSONDecodeError, ValueError):
            obj = None
        if not isinstance(obj, dict):
            out.append(0.0)
            continue
        wanted = dict(_PAIR.findall(_prompt_text(p).split(":", 1)[-1]))
        held = sum(str(obj.get(k, "")).strip().lower() == v.strip().lower() for k, v in wanted.items())
        whole = start == 0 and end == len(text) - 1
        out.append(0.25 + 0.25 * whole + 0.5 * (held / len(wanted) if wanted else 0.0))
    return out

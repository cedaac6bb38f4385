"""`HFEngine`: the engine interface on plain transformers `generate` (needs nothing but torch).

Prompts are batched left-padded (up to `max_batch_size` rows). Greedy when temperature is
0, otherwise sampling with temperature / top-p / top-k under `torch.manual_seed(seed)` in a
forked RNG, so a seeded call is reproducible without disturbing the caller's RNG (the same
prompts in the same batches give the same text; like all of torch's global RNG use, one
call at a time per process). `n > 1` uses `num_return_sequences`; greedy `n > 1` decodes
once and repeats the answer. Stop strings are checked on the decoded text of each row after
every step (a stopping criterion, so a row stops as soon as its text holds one) and the
text is cut before the first one. Log-probabilities come from the raw logits of each step
(`output_logits=True`), i.e. the model's distribution before temperature / top-p, as vLLM
reports them by default. `stream` runs `generate` in a thread with a
`TextIteratorStreamer` and yields text as tokens arrive.

Speculative decoding: with a `draft_model`, greedy requests run one prompt at a time (HF's
assisted generation is batch-size-1 only) with `assistant_model=draft`; the output is the
target's own greedy text. transformers does not report acceptance, so we count forward
calls with hooks: every target forward verifies one round of draft tokens and adds the
accepted ones plus one token of its own, so `accepted = new tokens - target forwards`;
every draft forward proposes one token, so `drafted = draft forwards`.
`last_speculation` holds those counts for the last `generate` call. Sampling requests
ignore the draft and decode normally.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmflow_ray.errors import UserError
from lmflow_ray.inference.engine import Completion, Engine, SamplingParams
from lmflow_ray.models.vision import as_rgb, is_vlm, load_processor
from lmflow_ray.models.zoo import base_and_adapter


@dataclass
class SpeculationStats:
    """Forward-call counts of one speculative `generate` call (see the module docstring)."""

    target_forwards: int = 0
    draft_forwards: int = 0
    new_tokens: int = 0

    @property
    def accepted(self) -> int:
        return self.new_tokens - self.target_forwards

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.draft_forwards if self.draft_forwards else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def cut_stream_at_stop(pieces: Iterator[str], stops: list[str]) -> Iterator[str]:
    """Pass text pieces through, ending before the first stop string (held back while it may still form)."""
    hold = max((len(s) for s in stops), default=1) - 1
    buf = ""
    for piece in pieces:
        buf += piece
        cut = first_stop(buf, stops)
        if cut is not None:
            if cut:
                yield buf[:cut]
            return
        if len(buf) > hold:
            yield buf[: len(buf) - hold]
            buf = buf[len(buf) - hold:]
    if buf:
        yield buf


def _stopping_criteria(tokenizer, stops: list[str], prompt_len: int, cancel: threading.Event | None):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            return torch.tensor([first_stop(t, stops) is not None for t in texts], device=input_ids.device)

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), device=input_ids.device)

    return StoppingCriteriaList(([StopOnText()] if stops else []) + ([Cancelled()] if cancel else []))


@contextlib.contextmanager
def _count_forwards(module):
    """Count forward calls of `module` (a list of one int) while the block runs."""
    calls = [0]
    if module is None:
        yield calls
        return
    core = module.get_base_model() if hasattr(module, "get_base_model") else module
    handle = core.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def _load_with_rope_scaling(model: str | Path, rope_scaling: dict, dtype=None):
    """(model, tokenizer) with `rope_scaling` set on the config before the weights load (RoPE tables are built then)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmflow_ray.models.loading import load_tokenizer, set_rope_scaling
    from lmflow_ray.models.zoo import base_and_adapter

    base, adapter = base_and_adapter(str(model))
    path = adapter or base
    config = set_rope_scaling(AutoConfig.from_pretrained(str(base)), rope_scaling)
    m = AutoModelForCausalLM.from_pretrained(str(base), config=config, dtype=dtype or torch.float32, use_safetensors=True)
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, str(path))
    return m.eval(), load_tokenizer(path)


class HFEngine(Engine):
    name = "engine hf"

    def __init__(self, model, tokenizer, template: str | None = None, draft=None, num_draft_tokens: int = 5,
                 max_batch_size: int = 16, processor=None):
        self.model, self.tokenizer, self.template, self.draft = model, tokenizer, template, draft
        self.max_batch_size = max_batch_size
        self.processor = processor  # a vision-language model's: images + text -> model inputs
        self.accepts_images = processor is not None
        if draft is not None:
            if draft is model:
                raise UserError("the draft must be a separate model object (load it again), not the target itself")
            if draft.config.get_text_config().vocab_size != model.config.get_text_config().vocab_size:
                raise UserError("the draft model must share the target's tokenizer (its vocabulary size differs); "
                                "pick a draft from the same model family")
            # HF reads these from the draft's own generation_config. A fixed k with no confidence cut-off
            # (vLLM's num_speculative_tokens) makes the acceptance rate a property of the draft alone.
            draft.generation_config.num_assistant_tokens = num_draft_tokens
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            draft.generation_config.assistant_confidence_threshold = 0.0
        eos = model.generation_config.eos_token_id
        self.eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                               *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
        self.last_speculation: SpeculationStats | None = None
        # After a `stream`: (tokens it generated, whether the last one ended the sequence), counted as `generate`
        # counts a completion's token_ids (its end-of-sequence token included).
        self.last_stream: tuple[int, bool] = (0, False)

    @classmethod
    def load(cls, model: str | Path, template: str | None = None, draft_model: str | Path | None = None,
             num_draft_tokens: int = 5, rope_scaling: dict | None = None, dtype=None, device: str | None = None,
             max_batch_size: int = 16) -> HFEngine:
        """Load a zoo name, HF dir, training output or LoRA adapter dir (and an optional draft model)."""
        import torch

        from lmflow_ray.models.loading import load_for_generation

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if rope_scaling:
            m, tok = _load_with_rope_scaling(model, rope_scaling, dtype)
        else:
            m, tok = load_for_generation(model, dtype=dtype)
        draft = load_for_generation(draft_model, dtype=dtype)[0].to(device) if draft_model else None
        processor = None
        base, _ = base_and_adapter(str(model))
        if is_vlm(base):
            if draft is not None:
                raise UserError("speculative decoding (a draft model) is for text models; drop the draft model")
            processor = load_processor(base)
        return cls(m.to(device), tok, template=template, draft=draft, num_draft_tokens=num_draft_tokens,
                   max_batch_size=max_batch_size, processor=processor)

    # ------------------------------------------------------------------ the interface

    def generate(self, prompts: list[str], params: SamplingParams, add_special_tokens: bool = True,
                 images: list[list] | None = None) -> list[list[Completion]]:
        if not self.check_images(prompts, images):
            images = None
        speculative = self.draft is not None and params.greedy
        size = 1 if speculative else self.max_batch_size
        stats = SpeculationStats() if speculative else None
        out: list[list[Completion]] = []
        for i in range(0, len(prompts), size):
            out += self._generate_batch(prompts[i:i + size], params, add_special_tokens, stats,
                                        images[i:i + size] if images else None)
        self.last_speculation = stats
        return out

    def stream(self, prompt: str, params: SamplingParams, add_special_tokens: bool = True,
               images: list | None = None) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        if params.n != 1:
            raise UserError(f"streaming gives one completion per prompt; got n={params.n}")
        batch_images = [list(images)] if self.check_images([prompt], [list(images or [])]) else None
        eos_ids, counts = set(self.eos_ids), [0, False]

        class Counting(TextIteratorStreamer):
            def put(self, value):
                if not (self.skip_prompt and self.next_tokens_are_prompt):
                    counts[0] += value.numel()
                    counts[1] = int(value.reshape(-1)[-1]) in eos_ids
                super().put(value)

        streamer = Counting(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        errors: list[BaseException] = []

        def work():
            try:
                self._run(self._encode([prompt], add_special_tokens, batch_images), params, streamer=streamer,
                          cancel=cancel)
            except BaseException as e:  # re-raised in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from cut_stream_at_stop(streamer, params.stop)
        finally:
            cancel.set()  # the consumer stopped early (or a stop string ended the text): stop generating
            thread.join()
            self.last_stream = (counts[0], counts[1])
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ internals

    def _encode(self, prompts: list[str], add_special_tokens: bool, images: list[list] | None = None):
        if self.processor is not None:  # expands each <image> to its feature positions; pixels for the images
            flat = [as_rgb(x) for row in (images or []) for x in row]
            enc = self.processor(images=flat or None, text=prompts, return_tensors="pt", padding=True,
                                 padding_side="left", add_special_tokens=add_special_tokens)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        else:
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                                 add_special_tokens=add_special_tokens)
        empty = [i for i, row in enumerate(enc["attention_mask"]) if int(row.sum()) == 0]
        if empty:
            raise UserError(f"prompt {empty[0]} of this batch is empty after tokenization; give it some text")
        return enc.to(self.model.device)

    def _generation_config(self, params: SamplingParams):
        from transformers import GenerationConfig

        # A fresh config: the model's own generation_config defaults (sampling, penalties) must not leak in.
        g = {"max_new_tokens": params.max_tokens, "eos_token_id": self.eos_ids, "pad_token_id": self.tokenizer.pad_token_id,
             "return_dict_in_generate": True, "output_logits": params.logprobs}
        if params.ignore_eos:
            g["min_new_tokens"] = params.max_tokens  # the end-of-sequence token is suppressed until then
        if params.greedy:
            g["do_sample"] = False
        else:
            g.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                     num_return_sequences=params.n)
        return GenerationConfig(**g)

    def _run(self, enc, params: SamplingParams, streamer=None, cancel=None, stats: SpeculationStats | None = None):
        import torch

        prompt_len = enc["input_ids"].shape[1]
        speculative = self.draft is not None and params.greedy and enc["input_ids"].shape[0] == 1
        kwargs = {"assistant_model": self.draft} if speculative else {}
        seeded = params.seed is not None and not params.greedy
        cuda = [self.model.device.index or 0] if self.model.device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=cuda) if seeded else contextlib.nullcontext()
        with (torch.no_grad(), rng, _count_forwards(self.model if speculative else None) as target,
              _count_forwards(self.draft if speculative else None) as draft):
            if seeded:
                torch.manual_seed(params.seed)
            out = self.model.generate(**enc, generation_config=self._generation_config(params), streamer=streamer,
                                      stopping_criteria=_stopping_criteria(self.tokenizer, params.stop, prompt_len, cancel),
                                      **kwargs)
        if speculative and stats is not None:
            stats.target_forwards += target[0]
            stats.draft_forwards += draft[0]
            stats.new_tokens += out.sequences.shape[1] - prompt_len
        return out

    def _generate_batch(self, prompts: list[str], params: SamplingParams, add_special_tokens: bool,
                        stats: SpeculationStats | None, images: list[list] | None = None) -> list[list[Completion]]:
        import torch

        enc = self._encode(prompts, add_special_tokens, images)
        out = self._run(enc, params, stats=stats)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        logprobs = top = None
        if params.logprobs:
            chosen, best = [], []  # per step, one full-vocabulary log_softmax at a time
            for t, step in enumerate(out.logits[: new.shape[1]]):
                lp = torch.log_softmax(step.float(), dim=-1)
                chosen.append(lp.gather(-1, new[:, t:t + 1]))
                if params.top_logprobs:
                    best.append(lp.topk(params.top_logprobs, dim=-1))  # (rows, k) values and ids
            logprobs = torch.cat(chosen, dim=1).tolist()
            if best:
                top = [[list(zip(b.indices[i].tolist(), b.values[i].tolist())) for b in best] for i in range(len(new))]
        rows = [self._completion(new[i].tolist(), logprobs[i] if logprobs else None, params, top[i] if top else None)
                for i in range(len(new))]
        per_prompt = 1 if params.greedy else params.n  # greedy n > 1: the same answer n times
        groups = [rows[i:i + per_prompt] for i in range(0, len(rows), per_prompt)]
        return [g * params.n if per_prompt == 1 and params.n > 1 else g for g in groups]

    def _completion(self, tokens: list[int], logprobs: list[float] | None, params: SamplingParams,
                    top: list | None = None) -> Completion:
        """One row's completion: cut after its end-of-sequence token (padding follows) or its first stop string."""
        reason = "length"
        end = next((i + 1 for i, t in enumerate(tokens) if t in self.eos_ids), None)
        if end is not None:
            tokens, reason = tokens[:end], "stop"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = first_stop(text, params.stop) if params.stop else None
        if cut is not None:
            # Keep the tokens up to the one that completed the stop string.
            end = next(k for k in range(1, len(tokens) + 1)
                       if first_stop(self.tokenizer.decode(tokens[:k], skip_special_tokens=True), params.stop) is not None)
            tokens, text, reason = tokens[:end], text[:cut], "stop"
        return Completion(text=text, token_ids=tokens, logprobs=logprobs[: len(tokens)] if logprobs else None,
                          finish_reason=reason, top_logprobs=top[: len(tokens)] if top else None)


def chat_generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                  temperature: float = 0.0, system: str | None = None) -> list[str]:
    """Answer each conversation (a list of {role, content}) with already-loaded objects; greedy when temperature == 0."""
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
    return [c[0].text.strip() for c in engine.chat(conversations, params, system=system)]

"""The one generation interface every caller uses (batch inference, eval, RLHF rollouts, serving).

An engine turns prompts into completions under `SamplingParams`; `HFEngine` (plain
transformers, streaming, speculative decoding) and `VLLMEngine` (vllm_engine.py) implement
the same methods. The parameter and result types follow vLLM's
(`SamplingParams`, `CompletionOutput`) so that engine is a thin adapter: `max_tokens`,
`n`, `stop`, per-token `logprobs` of the raw model distribution, `finish_reason` "stop"
(end-of-sequence token or stop string) or "length". `chat` is written once here: it
renders each conversation with the tokenizer's chat template, or a named template from
`data/templates.py` so inference sees exactly the text training did, then generates
without adding special tokens again (the rendered text already holds them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from lmflow_ray.errors import UserError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions allow 5


@dataclass
class SamplingParams:
    """How to sample. temperature 0 = greedy; top_k 0 = off; seed None = not reproducible."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    # With logprobs: also the this-many most likely tokens at each position (OpenAI's top_logprobs).
    top_logprobs: int = 0
    # Keep generating past the end-of-sequence token, up to max_tokens (vLLM's extension of the OpenAI API;
    # serving benchmarks use it so that every request produces the same number of tokens).
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"),
            (self.logprobs or not self.top_logprobs, "top_logprobs needs logprobs on"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty strings, got {self.stop}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"sampling parameters: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated continuation. `token_ids` include a final end-of-sequence token; `text` does not."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None  # log p(token) under the model's raw distribution, one per token_ids entry
    finish_reason: Literal["stop", "length"]
    # With params.top_logprobs = k: per position, the k most likely (token id, log p), most likely first.
    top_logprobs: list[list[tuple[int, float]]] | None = None


class TextDeltas:
    """vLLM reports a request's whole text so far; streaming sends only what is new. One per request."""

    def __init__(self):
        self.sent = ""

    def __call__(self, text: str) -> str:
        if len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


class Engine(ABC):
    """Prompts in, completions out. Subclasses set `tokenizer` and `template` and implement generate/stream.

    `images`: per prompt, the images (PIL images or file paths) its `<image>` placeholders stand for, in
    order; only an engine whose `accepts_images` is true takes them (a vision-language model)."""

    tokenizer = None
    template: str | None = None  # named conversation template; None = the tokenizer's chat_template
    accepts_images = False
    name = "engine"  # what errors call it

    @abstractmethod
    def generate(self, prompts: list[str], params: SamplingParams, add_special_tokens: bool = True,
                 images: list[list] | None = None) -> list[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order."""

    @abstractmethod
    def stream(self, prompt: str, params: SamplingParams, add_special_tokens: bool = True,
               images: list | None = None) -> Iterator[str]:
        """Text pieces of one completion as they are generated; their join is the completion's text."""

    def check_images(self, prompts: list[str], images: list[list] | None) -> bool:
        """Whether these prompts come with images; one line when this engine cannot take them or a
        prompt's placeholders do not match its images."""
        from lmflow_ray.data.formats import IMAGE_PLACEHOLDER

        given = bool(images and any(images))
        if given and not self.accepts_images:
            raise UserError(f"{self.name}: this model takes text only (it has no vision tower); send the request "
                            "without images, or serve a vision-language model (a LLaVA directory) with the hf engine")
        if self.accepts_images:
            for i, prompt in enumerate(prompts):
                n = len(images[i]) if given else 0
                if prompt.count(IMAGE_PLACEHOLDER) != n:
                    raise UserError(f"prompt {i}: {prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) "
                                    f"for {n} image(s); put one placeholder per image")
        return given

    def chat_prompt(self, messages: list[dict], system: str | None = None) -> str:
        """The generation prompt for a conversation: its turns so far, then the assistant header."""
        from lmflow_ray.data.templates import render_prompt

        return render_prompt(list(messages), system or "", self.template, self.tokenizer)

    def chat(self, conversations: list[list[dict]], params: SamplingParams, system: str | None = None,
             images: list[list] | None = None) -> list[list[Completion]]:
        prompts = [self.chat_prompt(msgs, system) for msgs in conversations]
        return self.generate(prompts, params, add_special_tokens=False, images=images)


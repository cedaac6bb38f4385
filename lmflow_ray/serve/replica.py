"""The model replicas of the Ray Serve application (`ModelServer`, one deployment per configured
base model; its LoRA adapters live in the same replicas): templating, token accounting and
context checks, then generation. HF replicas merge concurrent requests into batches with
`@serve.batch`; vLLM replicas batch continuously. Each has a bounded queue
(`max_ongoing_requests` + `max_queued_requests`): past it Serve refuses the call at once and the
client gets 503, never a hang.
"""

from __future__ import annotations

import logging
import time

from ray import serve

from lmflow_ray.errors import UserError
from lmflow_ray.serve.config import ModelSpec
from lmflow_ray.serve.protocol import IMAGE_PLACEHOLDER, APIError, choice, image_from_url

logger = logging.getLogger("ray.serve")

# ----------------------------------------------------------------------------- model replicas


# A stopping replica checks every 0.5 s (Serve's default: 2 s) whether its requests in flight are done.
@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10, health_check_timeout_s=60,
                  graceful_shutdown_wait_loop_s=0.5)
class ModelServer:
    def __init__(self, spec: dict):
        from lmflow_ray.serve.backends import make_backend

        self.spec = ModelSpec.model_validate(spec)
        self.backend = make_backend(self.spec)
        self._batched.set_max_batch_size(self.spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)

    def __del__(self):  # Serve calls it when it stops the replica
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.shutdown()

    # -- request preparation: everything that can be refused is refused before generating

    def _images(self, req: dict) -> list:
        """The request's images (a vision-language model's input), decoded; refused in one line otherwise."""
        urls = req.get("images") or []
        if not urls:
            return []
        if not self.backend.engine.accepts_images:
            raise APIError(400, f"model {req['model']} takes text only (it has no vision tower); send the request "
                           "without image_url parts, or to a vision-language model", param="messages")
        if len(urls) > self.spec.max_images_per_request:
            raise APIError(400, f"{len(urls)} images in one request, above this server's limit of "
                           f"{self.spec.max_images_per_request} (max_images_per_request)", param="messages")
        return [image_from_url(url, self.spec.max_image_bytes, i, self.spec.max_image_pixels)
                for i, url in enumerate(urls)]

    def _prepare(self, req: dict) -> tuple[list[str], int, bool, object, list]:
        from lmflow_ray.inference.engine import SamplingParams

        tok = self.backend.tokenizer
        images = self._images(req)
        if req["kind"] == "chat":
            prompts, special = [self.backend.engine.chat_prompt(req["messages"])], False
        else:
            prompts, special = req["prompts"], True
        if not prompts:
            raise APIError(400, "prompt is empty; give at least one prompt", param="prompt")
        extra = 0
        if self.backend.engine.accepts_images:
            # checked per request here: in a dynamic batch one request's mismatch would fail the others
            found = sum(p.count(IMAGE_PLACEHOLDER) for p in prompts)
            if found != len(images):
                raise APIError(400, f"{found} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s): each "
                               f"image_url part stands at its place in the text; do not write {IMAGE_PLACEHOLDER} "
                               "in the text yourself", param="messages")
            # an image takes one position per feature; its placeholder is one token of the prompt
            extra = len(images) * (self.backend.engine.model.config.image_seq_length - 1)
        lengths = [len(tok(p, add_special_tokens=special)["input_ids"]) + extra for p in prompts]
        ctx, limit = self.backend.context_len, self.spec.max_tokens_limit
        longest = max(lengths)
        if min(lengths) == 0:
            raise APIError(400, "prompt is empty after tokenization; give it some text", param="prompt")
        if longest >= ctx:
            raise APIError(400, f"this model's context is {ctx} tokens, but the prompt has {longest}; "
                           "shorten the prompt", param="messages" if req["kind"] == "chat" else "prompt",
                           code="context_length_exceeded")
        max_tokens = req["max_tokens"]
        if max_tokens is None:
            max_tokens = min(limit, ctx - longest)
        elif max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's limit of {limit}", param="max_tokens")
        elif longest + max_tokens > ctx:
            raise APIError(400, f"this model's context is {ctx} tokens: {longest} prompt + {max_tokens} max_tokens "
                           "do not fit; lower max_tokens or shorten the prompt", param="max_tokens",
                           code="context_length_exceeded")
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=req["temperature"], top_p=req["top_p"],
                                    top_k=req["top_k"], stop=req["stop"], seed=req["seed"], n=req["n"],
                                    logprobs=req["logprobs"], top_logprobs=req["top_logprobs"],
                                    ignore_eos=req["ignore_eos"])
        except UserError as e:
            raise APIError(400, e.message) from None
        return prompts, sum(lengths), special, params, images

    def _adapter(self, req: dict) -> str | None:
        return None if req["model"] == self.spec.name else req["model"]

    def _choice(self, c, kind: str, logprobs: bool) -> dict:
        return choice(c, kind, logprobs, self.backend.tokenizer.decode)

    # -- the two calls the ingress makes

    async def complete(self, req: dict) -> dict:
        try:
            prompts, prompt_tokens, special, params, images = self._prepare(req)
            adapter = self._adapter(req)
            if images:  # one request with its images (dynamic batches hold text requests)
                groups = await self.backend.generate(prompts, params, adapter, special, images=[images])
            elif self.spec.engine == "hf":
                groups = await self._batched((prompts, params, adapter, special))
                if isinstance(groups, BaseException):
                    raise groups
            else:
                groups = await self.backend.generate(prompts, params, adapter, special)
        except APIError as e:
            return {"status": e.status, "error": e.body()}
        except UserError as e:
            return {"status": 400, "error": APIError(400, e.message).body()}
        return {"groups": [[self._choice(c, req["kind"], bool(req["logprobs"])) for c in g] for g in groups],
                "prompt_tokens": prompt_tokens}

    async def stream(self, req: dict):
        """First {"ok": prompt_tokens} or {"status", "error"}; then {"text"} pieces; then {"finish_reason", "tokens"}."""
        try:
            prompts, prompt_tokens, special, params, images = self._prepare(req)
            if len(prompts) != 1 or params.n != 1:
                raise APIError(400, "streaming returns one completion: use one prompt and n = 1", param="n")
        except APIError as e:
            yield {"status": e.status, "error": e.body()}
            return
        yield {"ok": prompt_tokens}
        async for item in self.backend.stream(prompts[0], params, self._adapter(req), special, images=images):
            yield {"text": item} if isinstance(item, str) else {"finish_reason": item.reason, "tokens": item.tokens}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _batched(self, items: list[tuple]) -> list[list[list]]:
        """Concurrent HF requests in one call: those with the same adapter and sampling run as one batch.

        A group generates up to its largest max_tokens; shorter requests are cut to their own
        max_tokens afterwards (the same tokens they would get alone, for greedy decoding).
        """
        from dataclasses import replace

        groups: dict[tuple, list[int]] = {}
        for i, (_, params, adapter, special) in enumerate(items):
            key = (adapter, special, params.temperature, params.top_p, params.top_k, tuple(params.stop), params.seed,
                   params.n, params.logprobs, params.top_logprobs, params.ignore_eos)
            groups.setdefault(key, []).append(i)
        results: list = [None] * len(items)
        t0 = time.perf_counter()
        for idx in groups.values():
            prompts = [p for i in idx for p in items[i][0]]
            first = items[idx[0]][1]
            longest = max(items[i][1].max_tokens for i in idx)
            try:
                out = await self.backend.generate(prompts, replace(first, max_tokens=longest), items[idx[0]][2],
                                                  items[idx[0]][3])
            except Exception as e:  # one group's failure is its requests' failure only
                for i in idx:
                    results[i] = e
                continue
            pos = 0
            for i in idx:
                n = len(items[i][0])
                results[i] = [[self._cut(c, items[i][1].max_tokens) for c in g] for g in out[pos:pos + n]]
                pos += n
        logger.info("batch of %d requests in %d groups: %.2f s", len(items), len(groups), time.perf_counter() - t0)
        return results

    def _cut(self, c, max_tokens: int):
        if len(c.token_ids) <= max_tokens:
            return c
        from lmflow_ray.inference.engine import Completion

        ids = c.token_ids[:max_tokens]
        return Completion(text=self.backend.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                          logprobs=c.logprobs[:max_tokens] if c.logprobs else None, finish_reason="length",
                          top_logprobs=c.top_logprobs[:max_tokens] if c.top_logprobs else None)

    def info(self) -> dict:
        return {"context_len": self.backend.context_len}

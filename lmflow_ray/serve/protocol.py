"""OpenAI-compatible request and response shapes (the subset lmflow-ray serves).

Requests are pydantic models: a wrong type, a missing field or an unknown role becomes a 400
in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, naming the
field. Unknown extra fields are ignored, as clients send fields we do not use.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator


class APIError(Exception):
    """An error answered to the client as `status` + OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_body(cls, status: int, body: dict) -> APIError:
        e = body["error"]
        return cls(status, e["message"], e["type"], e.get("param"), e.get("code"))


def validation_message(error: dict, content_type: str | None) -> tuple[str, str | None]:
    """(message, param) for the first pydantic error of a request body: names the field, or the body itself."""
    loc = [str(x) for x in error["loc"] if x != "body"]
    param = ".".join(loc) or None
    kind = error["type"]
    if kind == "json_invalid":
        return f"request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})", None
    if kind == "value_error":
        msg = error["msg"].removeprefix("Value error, ")
        return (f"{param}: {msg}" if param else msg), param
    if param is None:  # the body as a whole is not a JSON object
        ctype = (content_type or "").split(";")[0].strip()
        if ctype != "application/json":
            return (f"the request body must be a JSON object sent with 'Content-Type: application/json' "
                    f"(got Content-Type {ctype or 'none'!r})"), None
        if kind == "missing":
            return "the request body is empty; send a JSON object with the request's fields", None
        got = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
            type(error.get("input")), "not an object")
        return f"the request body must be a JSON object with the request's fields, got {got}", None
    if kind == "missing":
        return f"'{param}' is a required field", param
    if kind == "literal_error" and loc[-1] == "role":
        return f"{param}: unknown role {error.get('input')!r}; use system, user or assistant", param
    return f"{param}: {error['msg']} (got {error.get('input')!r})", param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)

    model: str
    max_tokens: int | None = Field(default=None, description="None: up to the context limit (and max_tokens_limit)")
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="an extension of OpenAI's API; 0 = off")
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    # Strict: OpenAI refuses "yes" or 1 for a boolean; coercing them would hide a client bug.
    stream: StrictBool = False
    # With stream: {"include_usage": true} adds a last chunk holding the token counts (OpenAI's stream_options).
    stream_options: StreamOptions | None = None
    # vLLM's extension: generate up to max_tokens even past the end-of-sequence token.
    ignore_eos: StrictBool = False

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"max_tokens must be >= 1, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


IMAGE_PLACEHOLDER = "<image>"  # where an image part stands in the text (data/formats.py's placeholder)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]

    def text(self) -> str:
        """The text, each image part as a placeholder where it stands."""
        if isinstance(self.content, str):
            return self.content
        # an image on a line of its own before its text, as image_text training data puts it
        return "".join(p.text if isinstance(p, TextPart) else IMAGE_PLACEHOLDER + "\n" for p in self.content)

    def image_urls(self) -> list[str]:
        return [] if isinstance(self.content, str) else [p.image_url.url for p in self.content
                                                         if isinstance(p, ImagePart)]


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: StrictBool = False
    # The this-many most likely tokens at each position (needs logprobs: true), as OpenAI's API.
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def plain_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def image_urls(self) -> list[str]:
        """The image parts' URLs in the order their placeholders stand in the conversation."""
        return [url for m in self.messages for url in m.image_urls()]


def image_from_url(url: str, max_bytes: int, index: int, max_pixels: int = 16_000_000):
    """A PIL image of a request's `data:` URL (base64 PNG / JPEG / ...); anything else is a 400 that says why.
    The server never fetches remote URLs."""
    import base64
    import binascii
    import io

    param = f"messages.image_url[{index}]"
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"image {index}: remote image URLs are not fetched by this server (no outbound "
                       "requests); send the image inline as a data: URL (data:image/png;base64,...)", param=param)
    head, sep, data = url.partition(",")
    if not (url.startswith("data:") and sep and head.endswith(";base64")):
        raise APIError(400, f"image {index}: expected a data: URL with base64 content (data:image/png;base64,...), "
                       f"got {url[:40]!r}", param=param)
    if len(data) * 3 // 4 > max_bytes + 3:
        raise APIError(400, f"image {index}: {len(data) * 3 // 4} bytes, above this server's limit of {max_bytes} "
                       "(max_image_bytes); send a smaller image", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"image {index}: the data: URL's content is not valid base64", param=param) from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > max_pixels:  # checked on the header, before decoding
                raise APIError(400, f"image {index}: {img.width}x{img.height} pixels, above this server's limit of "
                               f"{max_pixels} (max_image_pixels); send a smaller image", param=param)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise APIError(400, f"image {index}: not an image PIL can read ({type(e).__name__}); send PNG or JPEG",
                       param=param) from None


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions
    # Log-probability of each token plus the this-many most likely alternatives (OpenAI: at most 5).
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(model: str, groups: list[list[dict]], prompt_tokens: int) -> dict:
    choices, completion_tokens = [], 0
    for i, c in enumerate(groups[0]):
        choices.append({"index": i, "message": {"role": "assistant", "content": c["text"]},
                        "finish_reason": c["finish_reason"], "logprobs": c.get("logprobs")})
        completion_tokens += c["tokens"]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_response(model: str, groups: list[list[dict]], prompt_tokens: int) -> dict:
    choices, completion_tokens = [], 0
    for group in groups:
        for c in group:
            choices.append({"index": len(choices), "text": c["text"], "finish_reason": c["finish_reason"],
                            "logprobs": c.get("logprobs")})
            completion_tokens += c["tokens"]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(rid: str, model: str, created: int, kind: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream that asked for `stream_options: {include_usage: true}`: no choices, the counts."""
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def choice(c, kind: str, logprobs: bool, decode) -> dict:
    """A completion as the ingress returns it: text, finish reason, token count and (when asked) OpenAI's
    logprobs shape for `kind` ("chat" or "completion"); `decode` turns token ids into text."""
    out = {"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids), "logprobs": None}
    if logprobs and c.logprobs is not None:
        tokens = [decode([t]) for t in c.token_ids]
        top = c.top_logprobs or [[] for _ in tokens]
        if kind == "chat":
            out["logprobs"] = {"content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()),
                 "top_logprobs": [{"token": decode([a]), "logprob": alp, "bytes": list(decode([a]).encode())}
                                  for a, alp in alts]}
                for t, lp, alts in zip(tokens, c.logprobs, top)]}
        else:
            # OpenAI's legacy shape: per position the top alternatives and always the sampled token.
            out["logprobs"] = {"tokens": tokens, "token_logprobs": c.logprobs,
                               "top_logprobs": [{**{decode([a]): alp for a, alp in alts}, t: lp}
                                                for t, lp, alts in zip(tokens, c.logprobs, top)],
                               "text_offset": [sum(len(x) for x in tokens[:i]) for i in range(len(tokens))]}
    return out

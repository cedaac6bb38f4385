"""The HTTP front of the Ray Serve application (`OpenAIIngress`, FastAPI): `GET /health`,
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` = server-sent
events), the optional bearer key, and every error in OpenAI's error shape."""

from __future__ import annotations

import json
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmflow_ray.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    usage_chunk,
    validation_message,
)

# ----------------------------------------------------------------------------- HTTP front

app = FastAPI(title="lmflow-ray", docs_url=None, redoc_url=None)


def _error(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return _error(e)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, e: RequestValidationError):
    msg, param = validation_message(e.errors()[0], request.headers.get("content-type"))
    return _error(APIError(400, msg, param=param))


@app.exception_handler(StarletteHTTPException)
async def _http(request: Request, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error(APIError(e.status_code, str(e.detail), type=kind))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024, graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, servers: dict, owners: dict[str, str], bases: dict[str, str], api_key_env: str):
        self.servers, self.owners, self.bases = servers, owners, bases
        self.api_key = os.environ.get(api_key_env) or None
        self.created = int(time.time())

    def _auth(self, request: Request):
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    def _server(self, model: str):
        if model not in self.owners:
            raise APIError(404, f"model '{model}' does not exist; GET /v1/models lists the served ids", param="model",
                           code="model_not_found")
        return self.servers[self.owners[model]]

    @staticmethod
    async def _call(coro_factory):
        from ray.serve.exceptions import BackPressureError

        try:
            return await coro_factory()
        except BackPressureError:
            raise APIError(503, "the server is overloaded (its request queue is full); retry shortly",
                           type="overloaded_error", code="overloaded") from None

    @app.get("/health")
    async def health(self):
        """200 once every model has a replica answering; 503 while loading, or when one is down or overloaded."""
        import asyncio

        async def ready(server) -> bool:
            try:
                await asyncio.wait_for(server.info.remote(), timeout=10)
                return True
            except Exception:
                return False

        states = await asyncio.gather(*(ready(s) for s in self.servers.values()))
        down = [name for name, ok in zip(self.servers, states) if not ok]
        if down:
            return JSONResponse({"status": "unavailable", "models": down}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        data = [{"id": m, "object": "model", "created": self.created, "owned_by": "lmflow-ray",
                 "root": self.bases[m], "parent": None if m == owner else owner}
                for m, owner in self.owners.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self._auth(request)
        req = {"kind": "chat", "messages": body.plain_messages(), "images": body.image_urls(), **self._common(body),
               "max_tokens": body.max_completion_tokens or body.max_tokens, "logprobs": body.logprobs,
               "top_logprobs": body.top_logprobs or 0}
        return await self._respond(body, req, chat_response)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._auth(request)
        req = {"kind": "completion", "prompts": body.prompts(), **self._common(body), "max_tokens": body.max_tokens,
               "logprobs": body.logprobs is not None, "top_logprobs": body.logprobs or 0}
        return await self._respond(body, req, completion_response)

    @staticmethod
    def _common(body) -> dict:
        return {"model": body.model, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                "n": body.n, "stop": list(body.stop or []), "seed": body.seed, "ignore_eos": body.ignore_eos}

    async def _respond(self, body, req: dict, shape):
        server = self._server(body.model)
        if not body.stream:
            out = await self._call(lambda: server.complete.remote(req))
            if "error" in out:
                raise APIError.from_body(out["status"], out["error"])
            return shape(body.model, out["groups"], out["prompt_tokens"])
        gen = server.options(stream=True).stream.remote(req)
        first = await self._call(gen.__anext__)
        if "error" in first:
            raise APIError.from_body(first["status"], first["error"])
        usage = first["ok"] if body.stream_options and body.stream_options.include_usage else None
        return StreamingResponse(self._events(gen, req["kind"], body.model, usage), media_type="text/event-stream")

    @staticmethod
    async def _events(gen, kind: str, model: str, prompt_tokens: int | None):
        """Server-sent events of one streamed completion; with `prompt_tokens` (stream_options.include_usage) a
        last chunk holds the token counts."""
        rid, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
        if kind == "chat":
            yield _sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
        try:
            async for ev in gen:
                if "text" in ev:
                    chunk = chat_chunk(rid, model, created, {"content": ev["text"]}) if kind == "chat" \
                        else completion_chunk(rid, model, created, ev["text"])
                else:
                    chunk = chat_chunk(rid, model, created, {}, ev["finish_reason"]) if kind == "chat" \
                        else completion_chunk(rid, model, created, "", ev["finish_reason"])
                    if prompt_tokens is not None:
                        yield _sse(chunk)
                        chunk = usage_chunk(rid, model, created, kind, prompt_tokens, ev["tokens"])
                yield _sse(chunk)
        except Exception as e:  # the status line is sent already: report in-band, as OpenAI does
            err = APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
            yield _sse(err.body())
        yield _sse("[DONE]")

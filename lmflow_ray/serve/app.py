"""The Ray Serve application: an OpenAI-compatible HTTP API over the engine interface.

Two deployments:
- `ModelServer`, one per configured base model (its LoRA adapters live in the same
  replicas): templating, token accounting and context checks, then generation. HF
  replicas merge concurrent requests into batches with `@serve.batch`; vLLM replicas batch
  continuously. Each has a bounded queue (`max_ongoing_requests` + `max_queued_requests`):
  past it Serve refuses the call at once and the client gets 503, never a hang.
- `OpenAIIngress`, the FastAPI front: `GET /health`, `GET /v1/models`,
  `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` = server-sent
  events), the optional bearer key, and every error in OpenAI's error shape.

`build_app(args)` is the import path for `serve run serve/X.yaml`; `run_server` is
`lmflow-ray serve`.
"""

from __future__ import annotations

import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmflow_ray.errors import UserError
from lmflow_ray.serve.config import ModelSpec, ServeConfig, parse_serve_config
from lmflow_ray.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    validation_message,
)

logger = logging.getLogger("ray.serve")

# ----------------------------------------------------------------------------- model replicas


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10, health_check_timeout_s=60)
class ModelServer:
    def __init__(self, spec: dict):
        from lmflow_ray.serve.backends import make_backend

        self.spec = ModelSpec.model_validate(spec)
        self.backend = make_backend(self.spec)
        self._batched.set_max_batch_size(self.spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)

    # -- request preparation: everything that can be refused is refused before generating

    def _prepare(self, req: dict) -> tuple[list[str], int, bool, object]:
        from lmflow_ray.inference.engine import SamplingParams

        tok = self.backend.tokenizer
        if req["kind"] == "chat":
            prompts, special = [self.backend.engine.chat_prompt(req["messages"])], False
        else:
            prompts, special = req["prompts"], True
        if not prompts:
            raise APIError(400, "prompt is empty; give at least one prompt", param="prompt")
        lengths = [len(tok(p, add_special_tokens=special)["input_ids"]) for p in prompts]
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
                                    logprobs=req["logprobs"], top_logprobs=req["top_logprobs"])
        except UserError as e:
            raise APIError(400, e.message) from None
        return prompts, sum(lengths), special, params

    def _adapter(self, req: dict) -> str | None:
        return None if req["model"] == self.spec.name else req["model"]

    def _choice(self, c, kind: str, logprobs: bool) -> dict:
        out = {"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids), "logprobs": None}
        if logprobs and c.logprobs is not None:
            decode = self.backend.tokenizer.decode
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

    # -- the two calls the ingress makes

    async def complete(self, req: dict) -> dict:
        try:
            prompts, prompt_tokens, special, params = self._prepare(req)
            adapter = self._adapter(req)
            if self.spec.engine == "hf":
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
        """First {"ok": prompt_tokens} or {"status", "error"}; then {"text"} pieces; then {"finish_reason"}."""
        try:
            prompts, prompt_tokens, special, params = self._prepare(req)
            if len(prompts) != 1 or params.n != 1:
                raise APIError(400, "streaming returns one completion: use one prompt and n = 1", param="n")
        except APIError as e:
            yield {"status": e.status, "error": e.body()}
            return
        yield {"ok": prompt_tokens}
        async for piece, reason in self.backend.stream(prompts[0], params, self._adapter(req), special):
            yield {"finish_reason": reason} if reason else {"text": piece}

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
                   params.n, params.logprobs, params.top_logprobs)
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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
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
        req = {"kind": "chat", "messages": body.plain_messages(), **self._common(body),
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
                "n": body.n, "stop": list(body.stop or []), "seed": body.seed}

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
        return StreamingResponse(self._events(gen, req["kind"], body.model), media_type="text/event-stream")

    @staticmethod
    async def _events(gen, kind: str, model: str):
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
                yield _sse(chunk)
        except Exception as e:  # the status line is sent already: report in-band, as OpenAI does
            err = APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
            yield _sse(err.body())
        yield _sse("[DONE]")


# ----------------------------------------------------------------------------- building and running


def build(cfg: ServeConfig):
    servers, owners, bases = {}, {}, {}
    for i, spec in enumerate(cfg.models):
        opts = {"name": f"Model{i}", "max_ongoing_requests": spec.max_ongoing_requests,
                "max_queued_requests": spec.max_queued_requests,
                "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
                                      **({"resources": dict(spec.resources)} if spec.resources else {})}}
        if spec.max_replicas_per_node:
            opts["max_replicas_per_node"] = spec.max_replicas_per_node
        if spec.autoscaling:
            opts["autoscaling_config"] = spec.autoscaling.model_dump()
        else:
            opts["num_replicas"] = spec.num_replicas
        servers[spec.name] = ModelServer.options(**opts).bind(spec.model_dump())
        for m in spec.ids:
            owners[m], bases[m] = spec.name, spec.path
    actor = {"num_cpus": 0}
    key = os.environ.get(cfg.api_key_env)
    if key:
        # Where the app is built (the `lmflow-ray serve` driver, or the cluster for `serve run`) has the
        # key: hand it to the front end's workers, which on a running cluster do not share this environment.
        actor["runtime_env"] = {"env_vars": {cfg.api_key_env: key}}
    return OpenAIIngress.options(max_ongoing_requests=cfg.max_ongoing_requests, ray_actor_options=actor).bind(
        servers, owners, bases, cfg.api_key_env)


def build_app(args: dict):
    """Import path for `serve run`: `lmflow_ray.serve.app:build_app` with `args` = a ServeConfig."""
    return build(parse_serve_config(dict(args)))


def check_address(host: str, port: int) -> int:
    """The address family of host:port, or one UserError line for a port out of range or an unknown host."""
    import socket

    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise UserError(f"port {port!r} is not a port number 1-65535; fix --port (or http_options.port of the "
                        "serve YAML), e.g. --port 8000")
    if not host:
        raise UserError("--host is empty; use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise UserError(f"--host {host}: not a known host name or address; use 127.0.0.1 or 0.0.0.0") from None


def check_listen(host: str, port: int) -> None:
    """Refuse, in one line, an address this machine cannot listen on or one another server holds."""
    import errno
    import socket

    family = check_address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR ignores sockets in TIME_WAIT but not a listening one (Serve's proxy, another server).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use (another server, perhaps another "
                                "`lmflow-ray serve`); pick a free --port or stop that server") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --host/--port") from None


def preflight(cfg: ServeConfig) -> None:
    """Check every model, draft and adapter path (building zoo models) before any replica starts."""
    from lmflow_ray.inference.vllm_engine import check_vllm_model
    from lmflow_ray.models.peft_utils import check_adapter_fits
    from lmflow_ray.models.zoo import base_and_adapter, resolve_model

    for spec in cfg.models:
        base, _ = base_and_adapter(spec.path)
        if spec.draft_model:
            resolve_model(spec.draft_model)
        for name, path in spec.adapters.items():
            try:
                check_adapter_fits(str(base), path)
            except UserError as e:
                raise UserError(f"adapter '{name}': {e.message}") from None
        if spec.engine == "vllm":
            check_vllm_model(spec.path)


def check_cluster_serve(name: str, port: int, route_prefix: str = "/") -> bool:
    """On a cluster that already runs Serve: refuse to replace its application `name` or to move its HTTP port.

    Returns whether Serve was running there (its proxy already holds the port we will share).
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return False
    details = client.get_serve_details()
    running_port = (details.get("http_options") or {}).get("port")
    apps = details.get("applications") or {}
    if name in apps:
        raise UserError(f"this Ray cluster already serves an application '{name}' (HTTP port {running_port}); "
                        "stop it first (`serve shutdown`, or Ctrl-C where it was started), or serve on another cluster")
    if running_port is not None and running_port != port:
        raise UserError(f"Serve already runs on this Ray cluster with HTTP on port {running_port}; it cannot also "
                        f"listen on {port}: use --port {running_port} to add this application beside the others")
    taken = next((app for app, d in apps.items() if d.get("route_prefix") == route_prefix), None)
    if taken:
        raise UserError(f"route prefix {route_prefix} is taken by application '{taken}' on this Ray cluster; "
                        "serve under another prefix or stop that application first")
    return True


def run_server(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
               name: str = "lmflow", route_prefix: str = "/"):
    """Start Serve on host:port (joining RAY_ADDRESS or a local cluster) and deploy the app.

    A port another server holds, an application of the same name already on the cluster, or a bad
    model/adapter path is one error line before anything is deployed; nothing running is replaced.
    """
    import sys

    import ray

    from lmflow_ray.runtime import init_ray

    check_address(host, port)
    joining = bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
    if not joining:  # a private cluster has no Serve yet: whatever holds the port is another server
        check_listen(host, port)
    preflight(cfg)
    init_ray()
    shared = False
    if joining:
        shared = check_cluster_serve(name, port, route_prefix)
        if shared:
            print(f"[lmflow-ray] Serve already runs on this Ray cluster: adding application '{name}' at "
                  f"{route_prefix} beside the others", file=sys.stderr)
        else:
            check_listen(host, port)
    serve.start(http_options={"host": host, "port": port})
    print(f"starting {len(cfg.models)} model(s): {', '.join(m for s in cfg.models for m in s.ids)} ...", file=sys.stderr)
    t0 = time.time()
    serve.run(build(cfg), name=name, route_prefix=route_prefix, blocking=False)
    base = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    print(f"ready in {time.time() - t0:.0f} s: {base}/v1 (OpenAI API), {base}/health", file=sys.stderr, flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            if joining:  # only our application goes: others (added before or after) keep running ...
                serve.delete(name)
                if not shared and not serve.status().applications:
                    serve.shutdown()  # ... and Serve itself, which we started, once nothing else uses it
            else:
                serve.shutdown()
    return base

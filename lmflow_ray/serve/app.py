"""The Ray Serve application: an OpenAI-compatible HTTP API over the engine interface.

Two deployments (built and run here):
- `ModelServer` (replica.py), one per configured base model (its LoRA adapters live in the same
  replicas): templating, token accounting and context checks, then generation. HF
  replicas merge concurrent requests into batches with `@serve.batch`; vLLM replicas batch
  continuously. Each has a bounded queue (`max_ongoing_requests` + `max_queued_requests`):
  past it Serve refuses the call at once and the client gets 503, never a hang.
- `OpenAIIngress` (ingress.py), the FastAPI front: `GET /health`, `GET /v1/models`,
  `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` = server-sent
  events), the optional bearer key, and every error in OpenAI's error shape.

`build_app(args)` is the import path for `serve run serve/X.yaml`; `run_server` is
`lmflow-ray serve`.
"""

from __future__ import annotations

import os
import time

from ray import serve

from lmflow_ray import console
from lmflow_ray.errors import UserError
from lmflow_ray.serve.config import ServeConfig, parse_serve_config
from lmflow_ray.serve.ingress import OpenAIIngress
from lmflow_ray.serve.replica import ModelServer


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
               name: str = "lmflow", route_prefix: str = "/", banner: str | None = None):
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
    logs = console.log_path()  # the replicas' and Serve's logs (a pipeline's OUT/logs, else a temp dir)
    print(f"ready in {time.time() - t0:.0f} s: {base}/v1 (OpenAI API), {base}/health"
          + (f"; logs: {logs}" if logs else ""), file=sys.stderr, flush=True)
    if banner:  # what to try against it (the pipeline's serve stage); {base} = the URL
        print(banner.replace("{base}", base), flush=True)
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

"""The serving config: which models to host, how to batch, scale and guard them.

The same YAML file works two ways: `serve run serve/X.yaml` (Ray Serve's own config format:
`http_options` + `applications`, whose `args` are a `ServeConfig`) and
`lmflow-ray serve --config serve/X.yaml`, which reads the same `http_options` and first
application's `args`. `lmflow-ray serve --model M` builds a `ServeConfig` from flags.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError, field_validator, model_validator

from lmflow_ray.config import (
    TEMPLATE_NAMES,
    AtLeast0,
    AtLeast1,
    NonNegative,
    Positive,
    Strict,
    check_rope_scaling,
)
from lmflow_ray.config_loading import format_validation_error, read_yaml
from lmflow_ray.errors import UserError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class Autoscaling(Strict):
    """Ray Serve autoscaling of one model's replicas (see Serve's `autoscaling_config`)."""

    min_replicas: AtLeast0 = 1
    max_replicas: AtLeast1 = 1
    # Replicas are added when the average number of requests in flight per replica exceeds this.
    target_ongoing_requests: Positive = 8.0
    upscale_delay_s: NonNegative = 5.0
    downscale_delay_s: NonNegative = 60.0
    # The window over which requests in flight are averaged (Serve's default 30 s).
    look_back_period_s: Positive = 30.0

    @model_validator(mode="after")
    def _order(self):
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                             f"got {self.min_replicas}..{self.max_replicas}")
        return self


class ModelSpec(Strict):
    """One served base model (and the LoRA adapters served beside it)."""

    # The id clients put in the request's `model` field; default: the path's last part.
    name: str | None = None
    # Zoo name, HF model dir, training output dir or LoRA adapter dir.
    path: str
    engine: Literal["hf", "vllm"] = "hf"
    # Conversation template; None = the tokenizer's own chat_template.
    template: str | None = None
    # Extra model ids served by this replica: {id: adapter dir} (LoRA adapters of this base).
    adapters: dict[str, str] = {}
    # transformers rope_scaling dict, e.g. {rope_type: linear, factor: 4.0} (hf engine).
    rope_scaling: dict | None = None
    # Context length (prompt + completion tokens); default: the model's max_position_embeddings.
    max_model_len: int | None = None
    # Largest `max_tokens` a request may ask for.
    max_tokens_limit: AtLeast1 = 1024
    # Speculative decoding draft model for greedy requests (hf engine).
    draft_model: str | None = None
    # Dynamic batching of concurrent requests (hf engine; vLLM batches continuously).
    max_batch_size: AtLeast1 = 16
    batch_wait_timeout_s: NonNegative = 0.02
    # Replicas: a fixed number, or autoscaling between bounds.
    num_replicas: AtLeast1 = 1
    autoscaling: Autoscaling | None = None
    # Requests one replica works on at once, and requests allowed to wait for one; beyond
    # that the server answers 503 at once instead of queueing without bound.
    max_ongoing_requests: AtLeast1 = 64
    max_queued_requests: AtLeast1 = 256
    # Ray CPUs reserved per replica and torch threads it uses (None: torch's default).
    num_cpus: NonNegative = 1.0
    # GPUs per replica (1 for a GPU engine), custom Ray resources (e.g. {gpu_node: 1}) and at most this
    # many replicas per node (1 spreads them, so losing a node loses one replica).
    num_gpus: NonNegative = 0.0
    resources: dict[str, Positive] = {}
    max_replicas_per_node: AtLeast1 | None = None
    torch_threads: AtLeast1 | None = None
    # vLLM: CPU KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE).
    kv_cache_gb: AtLeast1 = 2
    # Vision-language models: the largest image a request may carry (decoded bytes of its data: URL).
    max_image_bytes: AtLeast1 = 4 << 20
    max_image_pixels: AtLeast1 = 16_000_000  # width x height once decoded (a small PNG can hold a huge image)
    max_images_per_request: AtLeast1 = 8

    @field_validator("template")
    @classmethod
    def _known_template(cls, v):
        if v is not None and v not in TEMPLATE_NAMES:
            raise ValueError(f"unknown template '{v}'; known: {', '.join(TEMPLATE_NAMES)} (or omit it)")
        return v

    _rope = field_validator("rope_scaling")(classmethod(lambda cls, v: check_rope_scaling(v)))

    @model_validator(mode="after")
    def _fill(self):
        if self.name is None:
            self.name = Path(self.path.rstrip("/")).name or self.path
        for n in [self.name, *self.adapters]:
            if not NAME.match(n):
                raise ValueError(f"model id '{n}' must be 1-128 letters, digits or ._:/- characters")
        if self.max_model_len is not None and self.max_model_len < 8:
            raise ValueError("max_model_len must be >= 8")
        if self.draft_model and self.engine != "hf":
            raise ValueError("draft_model (speculative decoding) is an hf-engine option")
        return self

    @property
    def ids(self) -> list[str]:
        return [self.name, *self.adapters]


class ServeConfig(Strict):
    """The `args` of the lmflow-ray Serve application."""

    models: list[ModelSpec]
    # Name of the environment variable holding the API key. When that variable is set (in
    # the Ray cluster's environment), every route but /health needs `Authorization: Bearer KEY`.
    api_key_env: str = "LMFLOW_RAY_API_KEY"
    # Requests the HTTP front end works on at once (across all models).
    max_ongoing_requests: AtLeast1 = 1024

    @model_validator(mode="before")
    @classmethod
    def _one_model(cls, v: Any) -> Any:
        if isinstance(v, dict) and "model" in v and "models" not in v:
            v = {**v, "models": [v.pop("model") if isinstance(v["model"], dict) else {"path": v.pop("model")}]}
        return v

    @model_validator(mode="after")
    def _unique(self):
        if not self.models:
            raise ValueError("models: list at least one model to serve")
        seen: set[str] = set()
        for spec in self.models:
            for n in spec.ids:
                if n in seen:
                    raise ValueError(f"model id '{n}' is used twice; give each model and adapter its own name")
                seen.add(n)
        return self


def parse_serve_config(args: dict, source: str = "serve config") -> ServeConfig:
    try:
        return ServeConfig.model_validate(args)
    except ValidationError as err:
        raise format_validation_error(err, source) from None


def read_serve_yaml(path: str | Path) -> tuple[ServeConfig, dict]:
    """(config of the first application, http_options) from a `serve run` YAML file."""
    raw = read_yaml(path)
    apps = raw.get("applications")
    if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict):
        raise UserError(f"{path}: expected a Ray Serve config with an 'applications' list; see serve/smollm2.yaml")
    if len(apps) > 1:
        raise UserError(f"{path}: lmflow-ray serve runs one application; list several models under one "
                        f"application's args.models, or use `serve run {path}`")
    args = apps[0].get("args") or {}
    if not isinstance(args, dict):
        raise UserError(f"{path}: applications[0].args must be a mapping")
    return parse_serve_config(args, f"{path}: applications[0].args"), dict(raw.get("http_options") or {})

"""Reading a job config: a YAML file plus `--set a.b=c` overrides, validated against a schema of
config.py; every problem is one `UserError` line naming the file (or `config`), the key and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lmflow_ray.errors import UserError

C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set '{item}': expected key=value, e.g. --set train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set '{item}': empty key part; use dotted keys like train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if isinstance(node.get(k), str) and k == "data":
                node[k] = {"path": node[k]}
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--config {p} is a directory; pass a YAML file, e.g. {p / 'config.yaml'}")
    if not p.is_file():
        raise UserError(f"config file not found: {p}; pass an existing YAML file with --config")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: invalid YAML ({problem}); fix the syntax at that position") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text at byte {e.start}; save the config as UTF-8") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{p}: a config must be a YAML mapping of keys, got {type(raw).__name__}")
    return raw


BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def format_validation_error(err: ValidationError, source: str) -> UserError:
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif e["type"] in BOUNDS:
            (limit,) = e["ctx"].values()
            msg = f"must be {BOUNDS[e['type']]} {limit} (got {e['input']!r})"
        elif e["type"] == "missing":
            msg = "missing required key"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], dict) and e["type"] != "value_error":
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: key '{key}': {msg}" if key else f"{source}: {msg}")
    return UserError(lines[0], details=lines[1:])


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> C:
    raw = read_yaml(path) if path else dict(base or {})
    raw = apply_overrides(raw, overrides or [])
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, str(path) if path else "config") from None

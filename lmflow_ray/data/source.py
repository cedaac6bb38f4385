"""Finding, streaming and validating LMFlow dataset files.

A dataset is one `.json` file (`{"type": ..., "instances": [...]}`), one `.jsonl` file of
bare instances (type from config), or a directory of such files sharing one type.
Files are parsed as streams (ijson), so validation and reading hold one instance at a
time, never a whole multi-GB file. Every problem is reported with its file, and where it
applies the line/column or instance index and key; the CLI prints them one per line
(capped) and exits with status 2.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ijson

from lmflow_ray.data.formats import TYPES, check_instance, was_trimmed
from lmflow_ray.errors import UserError

SUFFIXES = (".json", ".jsonl")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_REPORTED = 20


class DataError(UserError):
    pass


@dataclass
class FileSummary:
    path: str
    type: str
    instances: int


@dataclass
class DatasetSummary:
    type: str
    files: list[FileSummary] = field(default_factory=list)
    trimmed: int = 0

    @property
    def instances(self) -> int:
        return sum(f.instances for f in self.files)


def list_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset not found: {p}; pass a .json/.jsonl file or a directory of them")
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise DataError(f"{p}: unsupported file type '{p.suffix}'; LMFlow datasets are .json or .jsonl")
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SUFFIXES)
    if not files:
        raise DataError(f"{p}: directory holds no .json or .jsonl files")
    return files


# ----------------------------------------------------------------------------- JSON errors


def _line_col_of_char(path: Path, offset: int) -> tuple[int, int]:
    line, col, seen = 1, 1, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        while seen < offset:
            chunk = f.read(min(1 << 20, offset - seen))
            if not chunk:
                break
            nl = chunk.count("\n")
            if nl:
                line += nl
                col = len(chunk) - chunk.rfind("\n")
            else:
                col += len(chunk)
            seen += len(chunk)
    return line, col


def find_bad_utf8(path: Path) -> str | None:
    """'line L, column C (byte B)' of the first invalid UTF-8 byte, or None."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    line, pos = 1, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                before = chunk[: e.start]
                line += before.count(b"\n")
                col = e.start - before.rfind(b"\n")
                return f"line {line}, column {col} (byte {pos + e.start})"
            line += chunk.count(b"\n")
            pos += len(chunk)
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"end of file (byte {pos})"
    return None


def describe_json_error(path: Path) -> str:
    """Locate the first JSON syntax error of a file that the fast parser rejected."""
    bad = find_bad_utf8(path)
    if bad:
        return f"{path}: not valid UTF-8 at {bad}; re-encode the file as UTF-8"
    # The pure-python backend reports character offsets; slower, but only on this error path.
    py = ijson.get_backend("python")
    try:
        with open(path, "rb") as f:
            for _ in py.parse(f):
                pass
    except Exception as e:  # ijson raises several types; all mean bad JSON
        msg = str(e)
        m = re.search(r"at (\d+)", msg)
        if m:
            line, col = _line_col_of_char(path, int(m.group(1)))
            detail = re.sub(r"\s*at \d+$", "", msg)
            return f"{path}:{line}:{col}: invalid JSON ({detail}); fix the syntax at that position"
        if "Incomplete" in type(e).__name__ or "premature" in msg.lower() or "incomplete" in msg.lower():
            return f"{path}: invalid JSON (file ends early, e.g. a missing ']' or '}}'); complete the file"
        return f"{path}: invalid JSON ({msg.splitlines()[0] if msg else type(e).__name__})"
    return f"{path}: invalid JSON"


# ----------------------------------------------------------------------------- streaming


def declared_type(path: Path) -> str | None:
    """The top-level "type" of a .json dataset file, read as a stream (usually the first key)."""
    try:
        with open(path, "rb") as f:
            for prefix, event, value in ijson.parse(f):
                if prefix == "" and event not in ("start_map", "end_map", "map_key"):
                    raise DataError(f"{path}: top level must be an object {{\"type\", \"instances\"}}, got JSON {event}")
                if prefix == "type":
                    if event != "string":
                        raise DataError(f"{path}: key 'type' must be a string, got JSON {event}")
                    return value
            return None
    except DataError:
        raise
    except Exception:
        raise DataError(describe_json_error(path)) from None


def _parse_jsonl_line(path: Path, lineno: int, text: str) -> object:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # e.colno counts from the last newline, so an error at the end of the line (a cut-off
        # instance) would read as column 1; the offset within the line is what the user needs.
        col = min(e.pos, len(text.rstrip("\r\n"))) + 1
        raise DataError(f"{path}:{lineno}:{col}: invalid JSON ({e.msg}); one instance per line") from None
    except RecursionError:
        raise DataError(f"{path}:{lineno}: JSON nested too deeply; flatten this instance") from None
    if _SURROGATE_ESCAPE.search(text):
        # json.loads keeps a lone "\ud800" as a surrogate that no UTF-8 writer (Arrow, the
        # tokenizer) accepts; the .json parser turns it into "?" instead.
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"{path}:{lineno}: lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair); "
                "it is not a character, remove or fix it"
            ) from None
    return obj


def _instances_event(path: Path) -> str | None:
    """The first JSON event of the top-level "instances" value (start_array when valid)."""
    with open(path, "rb") as f:
        for prefix, event, _ in ijson.parse(f):
            if prefix == "instances":
                return event
    return None


def iter_instances(path: Path) -> Iterator[tuple[int, int | None, object]]:
    """Yield (instance index, line number or None, instance) from one file, streaming."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            index = 0
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}:{e.start + 1}: not valid UTF-8; re-encode the file as UTF-8") from None
                yield index, lineno, _parse_jsonl_line(path, lineno, text)
                index += 1
        return
    try:
        # "instances.item" also matches a key named "item" of an instances *object*; only an
        # array holds instances. The "instances" key comes first or second, so this is quick.
        if _instances_event(path) not in (None, "start_array"):
            raise DataError(_instances_shape_problem(path))
        with open(path, "rb") as f:
            for index, obj in enumerate(ijson.items(f, "instances.item", use_float=True)):
                yield index, None, obj
    except DataError:
        raise
    except Exception:
        raise DataError(describe_json_error(path)) from None


def _instances_shape_problem(path: Path) -> str:
    """Why a .json file yielded no instances: missing key, not an array, or empty."""
    with open(path, "rb") as f:
        for prefix, event, _ in ijson.parse(f):
            if prefix == "instances":
                if event == "start_array":
                    return f"{path}: 'instances' is empty; add at least one instance"
                return f"{path}: 'instances' must be an array, got JSON {event}"
    return f"{path}: missing key 'instances'; a dataset file is {{\"type\": ..., \"instances\": [...]}}"


def file_type(path: Path, configured: str | None) -> str:
    if path.suffix == ".jsonl":
        if configured is None:
            raise DataError(f"{path}: .jsonl files hold bare instances; give their type (data.type in config, or --type)")
        return configured
    t = declared_type(path)
    if t is None:
        raise DataError(f"{path}: missing top-level key 'type'; add \"type\": one of {', '.join(TYPES)}")
    if t not in TYPES:
        raise DataError(f"{path}: unknown type '{t}'; use one of {', '.join(TYPES)}")
    if configured is not None and configured != t:
        raise DataError(f"{path}: file declares type '{t}' but the config says '{configured}'; make them agree")
    return t


def dataset_type(path: str | Path, configured: str | None = None) -> tuple[str, list[Path]]:
    """The single type shared by every file of a dataset (checked), and the files."""
    if configured is not None and configured not in TYPES:
        raise DataError(f"unknown dataset type '{configured}'; use one of {', '.join(TYPES)}")
    files = list_files(path)
    types = {f: file_type(f, configured) for f in files}
    distinct = sorted(set(types.values()))
    if len(distinct) > 1:
        detail = ", ".join(f"{f.name}={t}" for f, t in types.items())
        raise DataError(f"{path}: files of mixed types ({detail}); all files of one dataset must share one type")
    return distinct[0], files


def validate(path: str | Path, configured: str | None = None, max_reported: int = MAX_REPORTED) -> DatasetSummary:
    """Check every instance of a dataset; raise DataError listing the problems (capped)."""
    dtype, files = dataset_type(path, configured)
    summary = DatasetSummary(type=dtype)
    problems: list[str] = []
    total_problems = 0
    for f in files:
        count = 0
        for index, lineno, inst in iter_instances(f):
            count += 1
            found = check_instance(dtype, inst)
            if found:
                total_problems += len(found)
                where = f"{f}:{lineno}: instance {index}" if lineno else f"{f}: instance {index}"
                problems.extend(f"{where}: {p}" for p in found[: max(0, max_reported - len(problems))])
            elif was_trimmed(dtype, inst):
                summary.trimmed += 1
        if count == 0:
            total_problems += 1
            if len(problems) < max_reported:
                problems.append(
                    _instances_shape_problem(f) if f.suffix == ".json" else f"{f}: no instances; add at least one line"
                )
        summary.files.append(FileSummary(str(f), dtype, count))
    if problems:
        more = total_problems - len(problems)
        details = problems[1:] + ([f"... and {more} more problems"] if more > 0 else [])
        raise DataError(problems[0], details=details)
    return summary

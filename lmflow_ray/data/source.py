"""Finding, streaming and validating datasets.

A dataset is one file or a directory of files sharing one type:
- LMFlow `.json` (`{"type": ..., "instances": [...]}`) and `.jsonl` of bare instances;
- rows in other shapes (shapes.py: OpenAI chat, ShareGPT, Alpaca, preference pairs) in `.jsonl`,
  a `.json` array, Parquet or Arrow files, or a directory written by `datasets.save_to_disk`;
- a Hugging Face Hub dataset (`DataSpec.hf`), loaded through `datasets` where the Hub is reachable.

`resolve` decides the dataset's shape and LMFlow type (declared, from the file, or detected from
the first row) and `DataSource.instance` maps each row onto an LMFlow instance, so everything
downstream reads LMFlow instances. Files are parsed as streams (ijson; Parquet / Arrow record
batches), so validation and reading hold one batch at a time, never a whole multi-GB file. Every
problem is reported with its file, and where it applies the line/column or instance index and
key; the CLI prints them one per line (capped) and exits with status 2.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ijson

from lmflow_ray.data import shapes
from lmflow_ray.data.formats import TYPES, check_instance, image_list, was_trimmed
from lmflow_ray.errors import UserError

SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")
COLUMNAR = (".parquet", ".arrow")
ROWS_PER_BATCH = 1024
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
        raise DataError(f"dataset not found: {p}; pass a .json/.jsonl/.parquet/.arrow file or a directory of them")
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise DataError(f"{p}: unsupported file type '{p.suffix}'; datasets are .json, .jsonl, .parquet or .arrow "
                            "files (or a datasets.save_to_disk directory)")
        return [p]
    if (p / "dataset_dict.json").exists():
        splits = _json_file(p / "dataset_dict.json").get("splits") or sorted(d.name for d in p.iterdir() if d.is_dir())
        raise DataError(f"{p}: a DatasetDict saved with save_to_disk (splits: {', '.join(splits)}); "
                        f"point at one split, e.g. {p / splits[0]}" if splits else f"{p}: an empty DatasetDict")
    if (p / "state.json").exists() and (p / "dataset_info.json").exists():  # datasets.Dataset.save_to_disk
        state = _json_file(p / "state.json")
        files = [p / d["filename"] for d in state.get("_data_files", [])]
        missing = [f.name for f in files if not f.exists()]
        if missing or not files:
            raise DataError(f"{p}: save_to_disk directory without its data files ({', '.join(missing) or 'none listed'});"
                            " save the dataset again")
        return files
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SUFFIXES)
    if not files:
        raise DataError(f"{p}: directory holds no dataset files (.json, .jsonl, .parquet, .arrow)")
    return files


def _json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); save the dataset again") from None


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
    """Yield (row index, line number or None, row) from one file, streaming: LMFlow instances, JSON
    array elements, JSONL lines, Parquet / Arrow rows."""
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
    if path.suffix in COLUMNAR:
        yield from _columnar_rows(path)
        return
    try:
        if _top_level_event(path) == "start_array":  # a JSON array of rows (Alpaca / ShareGPT releases)
            with open(path, "rb") as f:
                for index, obj in enumerate(ijson.items(f, "item", use_float=True)):
                    yield index, None, obj
            return
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


def _top_level_event(path: Path) -> str | None:
    """The first JSON event of a file: start_map for LMFlow files, start_array for a JSON array of rows."""
    try:
        with open(path, "rb") as f:
            for _, event, _ in ijson.parse(f):
                return event
    except Exception:  # ijson raises several types; all mean bad JSON
        raise DataError(describe_json_error(path)) from None
    return None


def record_batches(path: Path, row_groups: list[int] | None = None):
    """Arrow record batches of a Parquet file (`row_groups`: only those) or an Arrow IPC file / stream."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            # One row group decoded at a time on this thread: pre-buffering and decode threads
            # held ~90 MB more at peak (1M-row file, row groups of 100k) and were no faster here.
            pf = pq.ParquetFile(path, pre_buffer=False)
            yield from pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=row_groups, use_threads=False)
            return
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:  # datasets writes the streaming format
                source.seek(0)
                batches = pa.ipc.open_stream(source)
            for batch in batches:
                for start in range(0, batch.num_rows, ROWS_PER_BATCH):
                    yield batch.slice(start, ROWS_PER_BATCH)
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if path.suffix == ".parquet" else "Arrow"
        raise DataError(f"{path}: not a readable {kind} file ({str(e).splitlines()[0]}); write it again") from None


def column_names(path: Path) -> list[str] | None:
    """The columns of a Parquet / Arrow file (from its schema), None for JSON files."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except Exception as e:  # pyarrow raises several types for a broken footer
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); write it again") from None
    if path.suffix == ".arrow":
        for batch in record_batches(path):
            return list(batch.schema.names)
    return None


def _columnar_rows(path: Path, row_groups: list[int] | None = None, start: int = 0):
    index = start
    for batch in record_batches(path, row_groups):
        for row in batch.to_pylist():
            yield index, None, row
            index += 1


def _instances_shape_problem(path: Path) -> str:
    """Why a .json file yielded no instances: missing key, not an array, or empty."""
    with open(path, "rb") as f:
        for prefix, event, _ in ijson.parse(f):
            if prefix == "instances":
                if event == "start_array":
                    return f"{path}: 'instances' is empty; add at least one instance"
                return f"{path}: 'instances' must be an array, got JSON {event}"
    return f"{path}: missing key 'instances'; a dataset file is {{\"type\": ..., \"instances\": [...]}}"


def file_type(path: Path, configured: str | None) -> str | None:
    """The type an LMFlow `.json` file declares (checked against the configured one); None for other files."""
    if path.suffix != ".json" or _top_level_event(path) == "start_array":
        return None
    t = declared_type(path)
    if t is None:
        raise DataError(f"{path}: missing top-level key 'type'; add \"type\": one of {', '.join(TYPES)}")
    if t not in TYPES:
        raise DataError(f"{path}: unknown type '{t}'; use one of {', '.join(TYPES)}")
    if configured is not None and configured != t:
        raise DataError(f"{path}: file declares type '{t}' but the config says '{configured}'; make them agree")
    return t


@dataclass
class DataSpec:
    """What a user points at: a path (or a Hub dataset name) and how to read its rows.

    `format`: auto | lmflow | hf | openai | sharegpt | alpaca | preference (shapes.py); `columns` maps the
    shape's field names to the file's column names ({prompt: question}); `roles` adds ShareGPT speaker
    tags ({bot: assistant})."""

    path: str | None = None
    type: str | None = None
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    hf: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return str(self.path) if self.path else f"hf:{self.hf}[{self.split}]"


def as_spec(data, configured: str | None = None) -> DataSpec:
    """`data` (a path, a DataSpec, or a job config's `data:` section) as a DataSpec; `configured` sets its type."""
    if not isinstance(data, (DataSpec, str, Path)):  # config.DataConfig
        data = DataSpec(path=data.path, type=data.type, format=data.format, columns=dict(data.columns),
                        roles=dict(data.roles), hf=data.hf, split=data.split)
    if isinstance(data, DataSpec):
        return data if configured is None or data.type == configured else DataSpec(**{**vars(data), "type": configured})
    return DataSpec(path=str(data), type=configured)


def hub_files(name: str, split: str) -> list[Path]:
    """The local Arrow files of Hub dataset `name` (downloaded by `datasets` into its cache)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.hf={name}: loading Hub datasets needs the `datasets` package "
                        "(pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline: ConnectionError / OfflineModeIsEnabled / DatasetNotFoundError ...
        raise DataError(
            f"data.hf={name}: cannot load it from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'}); where the Hub is reachable run "
            f"datasets.load_dataset('{name}', split='{split}').save_to_disk(DIR), copy DIR here and set data.path "
            "to it") from None
    return [Path(f["filename"]) for f in ds.cache_files]


@dataclass
class DataSource:
    """A resolved dataset: its files, the shape of their rows and the LMFlow type they map onto."""

    spec: DataSpec
    type: str
    shape: str
    files: list[Path]

    def rows(self, path: Path, row_groups: list[int] | None = None, start: int = 0):
        """(index, line or None, row with its columns renamed) of one file (`row_groups`: only those, Parquet)."""
        return self.renamed(_columnar_rows(path, row_groups, start) if row_groups is not None else iter_instances(path))

    def renamed(self, rows):
        """`rows` ((index, line, row) triples) with the spec's columns renamed."""
        if not self.spec.columns:
            yield from rows
            return
        for index, lineno, row in rows:
            yield index, lineno, rename_columns(row, self.spec.columns)

    def instance(self, row, path: Path | None = None) -> tuple[object, list[str]]:
        """(LMFlow instance, problems) of one row: its shape's problems, then the type's; with the row's
        file `path`, also an image it references that is not there (relative to that file's directory)."""
        inst, problems = shapes.to_instance(self.shape, self.type, row, self.spec.roles)
        problems = problems or check_instance(self.type, inst)
        if not problems and path is not None and self.type == "image_text":
            problems = [p for p in (_image_problem(x, path.parent) for x in image_list(inst)) if p][:1]
        return inst, problems

    def instances(self, file: Path | None = None) -> Iterator[dict]:
        """Every instance (of one of its files), mapped and checked (the first problem raises)."""
        for f in [file] if file is not None else self.files:
            for index, lineno, row in self.rows(f):
                inst, problems = self.instance(row)
                if problems:
                    raise DataError(f"{where(f, index, lineno)}: {problems[0]}")
                yield inst


def _image_problem(name: str, base: Path) -> str | None:
    """What is wrong with an image_text instance's image file (relative to its data file's directory):
    missing, unreadable, not an image, or cut short (PIL verifies the file without decoding its pixels)."""
    from PIL import Image, UnidentifiedImageError

    image = Path(name)
    file = image if image.is_absolute() else base / image
    try:
        if not file.is_file():
            return f"key 'image': file {json.dumps(name)} not found (paths are relative to {base})"
        with Image.open(file) as img:
            img.verify()  # reads the file through (a truncated or corrupt one fails) without decoding pixels
    except UnidentifiedImageError:
        return f"key 'image': {json.dumps(name)} is not an image file PIL can read (PNG, JPEG, WebP, GIF, BMP, ...)"
    except Exception as e:  # no permission, a NUL byte, a cut-short file (PIL raises OSError or SyntaxError)
        return f"key 'image': cannot read {json.dumps(name)} ({type(e).__name__}: {e})"
    return None


def where(path: Path, index: int, lineno: int | None) -> str:
    return f"{path}:{lineno}: instance {index}" if lineno else f"{path}: instance {index}"


def rename_columns(row, columns: dict[str, str]):
    if not isinstance(row, dict):
        return row
    out = dict(row)
    for name, column in columns.items():
        if column in out:
            out[name] = out.pop(column)
    return out


def resolve(data, configured: str | None = None) -> DataSource:
    """The dataset at `data` (a path or a DataSpec): files, row shape and LMFlow type, checked to agree."""
    spec = as_spec(data, configured)
    if spec.type is not None and spec.type not in TYPES:
        raise DataError(f"unknown dataset type '{spec.type}'; use one of {', '.join(TYPES)}")
    if spec.format not in shapes.FORMATS:
        raise DataError(f"unknown data format '{spec.format}'; use one of {', '.join(shapes.FORMATS)}")
    if spec.path:
        files = list_files(spec.path)
    elif spec.hf:
        files = hub_files(spec.hf, spec.split)
    else:
        raise DataError("no dataset given; set data.path (a file or directory) or data.hf (a Hub dataset name)")
    declared = {f: file_type(f, spec.type) for f in files}
    distinct = sorted({t for t in declared.values() if t})
    if len(distinct) > 1:
        detail = ", ".join(f"{f.name}={t}" for f, t in declared.items() if t)
        raise DataError(f"{spec}: files of mixed types ({detail}); all files of one dataset must share one type")
    dtype = spec.type or (distinct[0] if distinct else None)
    first_file = files[0]
    first = next(iter_instances(first_file), None)
    _check_columns(spec, first_file, first[2] if first else None)
    row = rename_columns(first[2], spec.columns) if first else None
    if spec.format != "auto":
        shape = spec.format
    elif distinct or row is None:  # LMFlow .json files hold LMFlow instances
        shape = "lmflow"
    else:
        shape = shapes.detect(row)
    if row is None and dtype is None:
        raise DataError(_no_instances(first_file))
    resolved, problem = shapes.lmflow_type(shape, row, dtype)
    if problem:
        raise DataError(f"{first_file}: {problem}")
    if dtype is not None and spec.type is None and resolved != dtype:
        raise DataError(f"{first_file}: declares type '{dtype}' but its rows are {shape} rows ({resolved})")
    return DataSource(spec, resolved, shape, files)


def _no_instances(path: Path) -> str:
    if path.suffix == ".json" and _top_level_event(path) == "start_map":
        return _instances_shape_problem(path)
    return f"{path}: no instances; add at least one {'line' if path.suffix == '.jsonl' else 'row'}"


def _check_columns(spec: DataSpec, path: Path, first_row) -> None:
    """Every column named in `columns` exists (checked on the schema, or the first row of JSON data)."""
    if not spec.columns:
        return
    present = column_names(path) or (sorted(first_row) if isinstance(first_row, dict) else [])
    missing = [(name, col) for name, col in spec.columns.items() if col not in present]
    if missing:
        name, col = missing[0]
        raise DataError(f"{path}: data.columns maps '{name}' to column '{col}', which is not there; "
                        f"its columns: {', '.join(present) or 'none'}")


def validate(path, configured: str | None = None, max_reported: int = MAX_REPORTED) -> DatasetSummary:
    """Check every instance of a dataset; raise DataError listing the problems (capped)."""
    src = resolve(path, configured)
    summary = DatasetSummary(type=src.type)
    problems: list[str] = []
    total_problems = 0
    for f in src.files:
        count = 0
        for index, lineno, row in src.rows(f):
            count += 1
            inst, found = src.instance(row, f)
            if found:
                total_problems += len(found)
                problems.extend(f"{where(f, index, lineno)}: {p}" for p in found[: max(0, max_reported - len(problems))])
            elif was_trimmed(src.type, inst):
                summary.trimmed += 1
        if count == 0:
            total_problems += 1
            if len(problems) < max_reported:
                problems.append(_no_instances(f))
        summary.files.append(FileSummary(str(f), src.type, count))
    if problems:
        more = total_problems - len(problems)
        details = problems[1:] + ([f"... and {more} more problems"] if more > 0 else [])
        raise DataError(problems[0], details=details)
    return summary

"""Reading datasets into Ray Data.

`read_dataset` returns a `ray.data.Dataset` of normalised LMFlow rows (one fixed Arrow schema
per type, see formats.py), whatever shape the files hold (source.py / shapes.py). The work
happens in Ray read tasks, never in the driver: each task streams its file (ijson, Parquet /
Arrow record batches), maps each row onto an LMFlow instance and yields blocks of
`rows_per_block` rows, so a multi-GB file is held one block at a time. Large `.jsonl` files are
split into byte ranges and large Parquet files into row-group ranges, so several tasks read one
file in parallel.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmflow_ray.data.formats import arrow_schema, check_instance, normalize
from lmflow_ray.data.source import DataError, DataSource, resolve

ROWS_PER_BLOCK = 20_000
JSONL_SPLIT_BYTES = 64 << 20


def _rows_to_table(rows: list[dict], schema):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=schema)


def _blocks(instances, dtype: str, where: str, rows_per_block: int, for_prompt: bool = False,
            source: DataSource | None = None, base: Path | None = None):
    """Arrow blocks of normalised rows; image_text rows name their images by absolute path (`base`: the
    directory of their data file, which relative paths start from)."""
    schema = arrow_schema(dtype)
    rows: list[dict] = []
    for index, lineno, inst in instances:
        inst, problems = source.instance(inst) if source else (inst, check_instance(dtype, inst))
        if problems:
            loc = f"{where}:{lineno}" if lineno else where
            raise DataError(f"{loc}: instance {index}: {problems[0]}")
        row = normalize(dtype, inst, for_prompt)
        if dtype == "image_text" and base is not None:
            row["image"] = [str(base / x) for x in row["image"]]  # an absolute path stays as it is
        rows.append(row)
        if len(rows) >= rows_per_block:
            yield _rows_to_table(rows, schema)
            rows = []
    if rows:
        yield _rows_to_table(rows, schema)


def _jsonl_range(path: Path, start: int, end: int):
    """Instances whose line starts in [start, end): each line belongs to exactly one range."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # finish the line that straddles `start`; the previous range owns it
        pos = f.tell()
        index = 0
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            if raw.strip():
                yield index, None, json.loads(raw)
                index += 1


def _make_read_tasks(src: DataSource, rows_per_block: int, for_prompt: bool = False):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    tasks = []
    dtype = src.type
    schema = arrow_schema(dtype)

    def task(f, rows, where):
        meta = BlockMetadata(num_rows=None, size_bytes=f.stat().st_size, input_files=[str(f)], exec_stats=None)
        return ReadTask(lambda: _blocks(rows(), dtype, where, rows_per_block, for_prompt, src, f.absolute().parent), meta,
                        schema=schema)

    for f in src.files:
        size = f.stat().st_size
        if f.suffix == ".jsonl" and size > JSONL_SPLIT_BYTES:
            for start in range(0, size, JSONL_SPLIT_BYTES):
                end = min(size, start + JSONL_SPLIT_BYTES)
                tasks.append(task(f, lambda f=f, start=start, end=end: src.renamed(_jsonl_range(f, start, end)),
                                  f"{f}@{start}"))
        elif f.suffix == ".parquet" and size > JSONL_SPLIT_BYTES:
            for groups, first_row in _row_group_ranges(f, JSONL_SPLIT_BYTES):
                tasks.append(task(f, lambda f=f, groups=groups, first_row=first_row: src.rows(f, groups, first_row),
                                  str(f)))
        else:
            tasks.append(task(f, lambda f=f: src.rows(f), str(f)))
    return tasks


def _row_group_ranges(path: Path, max_bytes: int):
    """([row groups], index of their first row) ranges of about `max_bytes` of a Parquet file."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    ranges, groups, size, first, row = [], [], 0, 0, 0
    for g in range(meta.num_row_groups):
        if groups and size + meta.row_group(g).total_byte_size > max_bytes:
            ranges.append((groups, first))
            groups, size, first = [], 0, row
        groups.append(g)
        size += meta.row_group(g).total_byte_size
        row += meta.row_group(g).num_rows
    if groups:
        ranges.append((groups, first))
    return ranges


def _datasource_class():
    from ray.data import Datasource

    class LMFlowDatasource(Datasource):
        """Ray Data source for LMFlow JSON/JSONL datasets (streaming, bounded memory)."""

        def __init__(self, src: DataSource, rows_per_block: int, for_prompt: bool = False):
            super().__init__()
            self.src, self.rows_per_block, self.for_prompt = src, rows_per_block, for_prompt

        def estimate_inmemory_data_size(self):
            return sum(f.stat().st_size for f in self.src.files)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return _make_read_tasks(self.src, self.rows_per_block, self.for_prompt)

        def get_name(self):
            return "LMFlowData"

    return LMFlowDatasource


def read_dataset(path, dtype: str | None = None, rows_per_block: int = ROWS_PER_BLOCK,
                 for_prompt: bool = False):
    """(Ray Dataset of normalised rows, dataset type) of `path` (a path or a DataSpec);
    `for_prompt`: conversation rows end at their last user turn."""
    import ray.data

    src = resolve(path, dtype)
    source = _datasource_class()(src, rows_per_block, for_prompt)
    return ray.data.read_datasource(source), src.type

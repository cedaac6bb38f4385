"""Reading LMFlow datasets into Ray Data.

`read_dataset` returns a `ray.data.Dataset` of normalised rows (one fixed Arrow schema
per type, see formats.py). The work happens in Ray read tasks, never in the driver:
each task streams its file with ijson and yields blocks of `rows_per_block` rows, so a
multi-GB file is held one block at a time. Large `.jsonl` files are also split into
byte ranges so several tasks read one file in parallel.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmflow_ray.data.formats import arrow_schema, check_instance, normalize
from lmflow_ray.data.source import DataError, dataset_type, iter_instances

ROWS_PER_BLOCK = 20_000
JSONL_SPLIT_BYTES = 64 << 20


def _rows_to_table(rows: list[dict], schema):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=schema)


def _blocks(instances, dtype: str, where: str, rows_per_block: int, for_prompt: bool = False):
    schema = arrow_schema(dtype)
    rows: list[dict] = []
    for index, lineno, inst in instances:
        problems = check_instance(dtype, inst)
        if problems:
            loc = f"{where}:{lineno}" if lineno else where
            raise DataError(f"{loc}: instance {index}: {problems[0]}")
        rows.append(normalize(dtype, inst, for_prompt))
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


def _make_read_tasks(files: list[Path], dtype: str, rows_per_block: int, for_prompt: bool = False):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    tasks = []
    schema = arrow_schema(dtype)
    for f in files:
        size = f.stat().st_size
        meta = BlockMetadata(num_rows=None, size_bytes=size, input_files=[str(f)], exec_stats=None)
        if f.suffix == ".jsonl" and size > JSONL_SPLIT_BYTES:
            for start in range(0, size, JSONL_SPLIT_BYTES):
                end = min(size, start + JSONL_SPLIT_BYTES)

                def read(f=f, start=start, end=end):
                    yield from _blocks(_jsonl_range(f, start, end), dtype, f"{f}@{start}", rows_per_block, for_prompt)

                tasks.append(ReadTask(read, meta, schema=schema))
        else:

            def read(f=f):
                yield from _blocks(iter_instances(f), dtype, str(f), rows_per_block, for_prompt)

            tasks.append(ReadTask(read, meta, schema=schema))
    return tasks


def _datasource_class():
    from ray.data import Datasource

    class LMFlowDatasource(Datasource):
        """Ray Data source for LMFlow JSON/JSONL datasets (streaming, bounded memory)."""

        def __init__(self, files: list[Path], dtype: str, rows_per_block: int, for_prompt: bool = False):
            super().__init__()
            self.files, self.dtype, self.rows_per_block, self.for_prompt = files, dtype, rows_per_block, for_prompt

        def estimate_inmemory_data_size(self):
            return sum(f.stat().st_size for f in self.files)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return _make_read_tasks(self.files, self.dtype, self.rows_per_block, self.for_prompt)

        def get_name(self):
            return "LMFlowJSON"

    return LMFlowDatasource


def read_dataset(path: str | Path, dtype: str | None = None, rows_per_block: int = ROWS_PER_BLOCK,
                 for_prompt: bool = False):
    """(Ray Dataset of normalised rows, dataset type); `for_prompt`: conversation rows end at their last user turn."""
    import ray.data

    dtype, files = dataset_type(path, dtype)
    source = _datasource_class()(files, dtype, rows_per_block, for_prompt)
    return ray.data.read_datasource(source), dtype

"""`lmflow-ray data convert`: any supported dataset as one LMFlow `.json` file.

The whole dataset is validated first (a problem anywhere writes nothing), then streamed
instance by instance into a temporary file beside the output, which is linked into place
only if no file of that name exists: an existing file is never overwritten, and an
interrupted conversion leaves no partial output.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from lmflow_ray.data.formats import normalize
from lmflow_ray.data.source import DataError, DatasetSummary, resolve, validate


def convert(data, out: str | Path, to: str = "lmflow") -> DatasetSummary:
    """Write `data` (a path or DataSpec) to `out` as `{"type": ..., "instances": [...]}`; the summary of what was written."""
    if to != "lmflow":
        raise DataError(f"--to {to}: only 'lmflow' is written")
    out = Path(out)
    if out.suffix != ".json":
        raise DataError(f"--out {out}: an LMFlow dataset file ends in .json; name it e.g. {out.with_suffix('.json')}")
    if out.exists():
        raise DataError(f"--out {out}: already exists; convert never overwrites, choose another name")
    summary = validate(data)
    src = resolve(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f'{{"type": {json.dumps(src.type)}, "instances": [')
            for i, inst in enumerate(src.instances()):
                f.write(("\n" if i == 0 else ",\n") + json.dumps(normalize(src.type, inst), ensure_ascii=False))
            f.write("\n]}\n")
        try:
            os.link(tmp, out)  # fails if `out` appeared meanwhile: nothing is overwritten
        except FileExistsError:
            raise DataError(f"--out {out}: already exists; convert never overwrites, choose another name") from None
    finally:
        os.unlink(tmp)
    return summary

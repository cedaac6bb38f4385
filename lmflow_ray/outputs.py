"""The one rule every job keeps for its output directory: it writes a new or an empty directory;
one that holds anything is refused in one line (nothing in it is touched), unless the job
continues the run that directory holds (`resume_from` naming it)."""

from __future__ import annotations

from pathlib import Path

from lmflow_ray.errors import UserError


def check_output_dir(output_dir: str | Path, resume_from: str | None = None) -> Path:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; give a directory (it may not exist yet)")
    if resume_from and "://" not in resume_from and Path(resume_from).resolve() == out.resolve():
        return out
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output_dir {out} is not empty; choose a new or empty output_dir (or set resume_from: {out} "
                        "to continue the run it holds)")
    return out

"""Memory and time of validating and reading a large LMFlow dataset, against `json.load`.

Generates a text_only dataset (default 1,000,000 instances, ~105 MB) as `.json` and as
`.jsonl` in a temporary directory, then measures each step in a fresh Python process so
every peak RSS (`ru_maxrss`) belongs to that step alone:

- `idle`: the interpreter with the data modules imported (the floor under every figure);
- `json_load`: `json.load` of the whole `.json` file (the naive baseline);
- `validate_json`, `validate_jsonl`: `lmflow_ray.data.source.validate`;
- `parquet_load`: `pyarrow.parquet.read_table` of the whole Parquet file (the columnar baseline);
- `validate_parquet`: `validate` on the same rows as Parquet (row groups of 100,000 rows);
- `read_json`, `read_jsonl`, `read_parquet`: `read_dataset`, then `ds.count()` and a pass over every
  batch summing text lengths; the driver's peak and the Ray workers' peak RSS (sampled
  with psutil; the workers are descendants of the driver, which started the local Ray),
  as RSS and as private memory (RSS less shared pages: the object store is shared memory).

Prints one JSON object. `tests/test_data_reader.py` runs the validate step through this
script, so the test and the recorded figures come from the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = ("the king sees a green tree by the sea our neighbor feeds old clock on hill child paints river "
         "farmer finds red ball garden dog follows tall house market sister brother cat sleeps").split()
STEPS = ("idle", "json_load", "validate_json", "validate_jsonl", "read_json", "read_jsonl",
         "parquet_load", "validate_parquet", "read_parquet")
PARQUET_ROW_GROUP = 100_000


def texts(n: int, seed: int = 0):
    """n deterministic sentences of 8-24 words (~100 bytes on average)."""
    rng = random.Random(seed)
    for i in range(n):
        yield f"{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(8, 24))) + "."


def write_text_only(folder: Path, n: int) -> tuple[Path, Path]:
    """The same n instances as data.json ({"type", "instances"}) and data.jsonl (bare)."""
    json_path, jsonl_path = folder / "data.json", folder / "data.jsonl"
    with open(json_path, "w") as fj, open(jsonl_path, "w") as fl:
        fj.write('{"type": "text_only", "instances": [\n')
        for i, text in enumerate(texts(n)):
            line = json.dumps({"text": text})
            fj.write(("," if i else "") + line + "\n")
            fl.write(line + "\n")
        fj.write("]}\n")
    return json_path, jsonl_path


def write_parquet(folder: Path, n: int) -> Path:
    """The same n instances as a Parquet file with a `text` column, written in row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "data.parquet"
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        chunk: list[str] = []
        for text in texts(n):
            chunk.append(text)
            if len(chunk) == PARQUET_ROW_GROUP:
                writer.write_table(pa.table({"text": chunk}, schema=schema))
                chunk = []
        if chunk:
            writer.write_table(pa.table({"text": chunk}, schema=schema))
    return path


def _peak_mb(who=resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # ru_maxrss is in KiB on Linux


class RssSampler:
    """Peak memory of this process and of its Ray workers ("ray::<task>" processes), sampled.

    Per process: peak RSS, and peak private memory (RSS less shared pages). Blocks live in
    Ray's shared-memory object store; a process that writes or reads a block maps those
    pages, and RSS counts them although they are not the process's own.
    A worker is renamed for each task it runs, so a worker is told apart by whether it
    ever ran a read task.
    """

    def __init__(self, interval: float = 0.05):
        self.interval, self.peaks = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, p, name: str) -> None:
        import psutil

        try:
            mem = p.memory_info()
        except psutil.Error:
            return
        peak = self.peaks.setdefault(p.pid, {"names": set(), "rss": 0, "private": 0})
        peak["names"].add(name)
        peak["rss"] = max(peak["rss"], mem.rss)
        peak["private"] = max(peak["private"], mem.rss - mem.shared)

    def _run(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            self._sample(me, "driver")
            for p in me.children(recursive=True):
                try:
                    name = p.name()
                except psutil.Error:
                    continue
                if name.startswith("ray::"):
                    self._sample(p, name)
            self._stop.wait(self.interval)

    def peak_mb(self, key: str, ran: str) -> float:
        """Largest `key` peak over the processes that ever ran a task whose name contains `ran`."""
        values = [v[key] for v in self.peaks.values() if any(ran in n for n in v["names"])]
        return round(max(values, default=0) / 2**20, 1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _read(path: Path) -> dict:
    import psutil
    import pyarrow.compute as pc

    from lmflow_ray.data.reader import read_dataset
    from lmflow_ray.runtime import init_ray

    start = time.perf_counter()
    ray = init_ray()
    ready = time.perf_counter()
    driver_after_init = psutil.Process().memory_info().rss
    with RssSampler() as sampler:
        ds, _ = read_dataset(path, "text_only")
        rows = ds.count()
        counted = time.perf_counter()
        chars = seen = 0
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            seen += batch.num_rows
            chars += pc.sum(pc.utf8_length(batch["text"])).as_py() or 0
        done = time.perf_counter()
    ray.shutdown()
    return {"instances": rows, "rows_iterated": seen, "text_chars": chars,
            "ray_init_seconds": round(ready - start, 2), "count_seconds": round(counted - ready, 2),
            "iterate_seconds": round(done - counted, 2),
            "driver_rss_after_ray_init_mb": round(driver_after_init / 2**20, 1),
            "driver_private_peak_mb": sampler.peak_mb("private", "driver"),
            "read_worker_rss_peak_mb": sampler.peak_mb("rss", "Read"),
            "read_worker_private_peak_mb": sampler.peak_mb("private", "Read"),
            "read_workers": sum(any("Read" in n for n in v["names"]) for v in sampler.peaks.values())}


def run_step(step: str, path: Path) -> dict:
    """One measurement, in this (fresh) process."""
    from lmflow_ray.data.source import validate

    start = time.perf_counter()
    if step == "idle":
        out = {}
    elif step == "json_load":
        with open(path) as f:
            out = {"instances": len(json.load(f)["instances"])}
    elif step == "parquet_load":
        import pyarrow.parquet as pq

        out = {"instances": pq.read_table(path).num_rows}
    elif step.startswith("validate"):
        out = {"instances": validate(path, "text_only" if path.suffix == ".jsonl" else None).instances}
    else:
        out = _read(path)
    out = {"step": step, "seconds": round(time.perf_counter() - start, 2), **out,
           "peak_rss_mb": _peak_mb()}
    if step.startswith("read"):
        # Terminated descendants after ray.shutdown(): the largest of gcs, raylet, workers.
        out["children_peak_rss_mb"] = _peak_mb(resource.RUSAGE_CHILDREN)
    return out


def measure(step: str, path: Path, timeout: int = 900) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", step, str(path)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(instances: int, steps: tuple[str, ...]) -> dict:
    with tempfile.TemporaryDirectory(prefix="lmflow_bench_") as tmp:
        start = time.perf_counter()
        json_path, jsonl_path = write_text_only(Path(tmp), instances)
        report: dict = {"instances": instances, "json_mb": round(json_path.stat().st_size / 2**20, 1),
                        "jsonl_mb": round(jsonl_path.stat().st_size / 2**20, 1)}
        if any("parquet" in s for s in steps):
            # In a child: Linux keeps a process's peak RSS across exec, so pyarrow imported here
            # would raise the floor of every step measured after it.
            subprocess.run([sys.executable, __file__, "--write-parquet", tmp, str(instances)], check=True)
            parquet_path = Path(tmp) / "data.parquet"
            report["parquet_mb"] = round(parquet_path.stat().st_size / 2**20, 1)
        report["generate_seconds"] = round(time.perf_counter() - start, 2)
        for step in steps:
            report[step] = measure(step, parquet_path if "parquet" in step else
                                   jsonl_path if step.endswith("jsonl") else json_path)
    if "validate_json" in report and "json_load" in report:
        report["validate_over_json_load_peak"] = round(
            report["validate_json"]["peak_rss_mb"] / report["json_load"]["peak_rss_mb"], 3)
    if "validate_parquet" in report and "parquet_load" in report:
        report["validate_over_parquet_load_peak"] = round(
            report["validate_parquet"]["peak_rss_mb"] / report["parquet_load"]["peak_rss_mb"], 3)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=1_000_000)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--child", nargs=2, metavar=("STEP", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--write-parquet", nargs=2, metavar=("DIR", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write_parquet:
        write_parquet(Path(args.write_parquet[0]), int(args.write_parquet[1]))
        return
    if args.child:
        print(json.dumps(run_step(args.child[0], Path(args.child[1]))))
        return
    steps = tuple(s for s in args.steps.split(",") if s)
    unknown = set(steps) - set(STEPS)
    if unknown:
        sys.exit(f"error: unknown step(s) {', '.join(sorted(unknown))}; use {', '.join(STEPS)}")
    print(json.dumps(run(args.instances, steps), indent=2))


if __name__ == "__main__":
    main()

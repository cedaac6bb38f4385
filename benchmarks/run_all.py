"""Run every benchmark script in this folder (each in its own subprocess) and print their JSON.

Each script prints one JSON object on stdout (on one line or indented); this prints one
JSON object mapping script name to that object, or to {"error", "returncode", "stdout_tail"}
when a script fails, so one failing benchmark does not hide the others. Scripts run with
their default arguments; name some (`run_all.py lora_memory`) to run only those.
Files starting with `_` are helpers, not benchmarks. Exit status 1 if any script failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts(names: list[str]) -> list[Path]:
    found = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))
    unknown = set(names) - {p.stem for p in found}
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {[p.stem for p in found]}")
    return [p for p in found if not names or p.stem in names]


def last_json_object(text: str) -> dict | None:
    """The JSON object that ends the output (stray lines before it are ignored)."""
    text = text.strip()
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and text.startswith("{", i + 1)]
    decoder = json.JSONDecoder()
    for start in reversed(starts):
        try:
            obj, end = decoder.raw_decode(text[start:])
        except ValueError:
            continue
        if isinstance(obj, dict) and not text[start + end:].strip():
            return obj
    return None


def main() -> int:
    results, failed = {}, False
    for script in scripts(sys.argv[1:]):
        print(f"[bench] {script.name} ...", file=sys.stderr, flush=True)
        started = time.time()
        proc = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        obj = last_json_object(proc.stdout) if proc.returncode == 0 else None
        if obj is None:
            failed = True
            obj = {"error": "no JSON object on stdout", "returncode": proc.returncode, "stdout_tail": proc.stdout[-2000:]}
        results[script.stem] = obj
        print(f"[bench] {script.name}: rc {proc.returncode}, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

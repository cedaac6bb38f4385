"""Run every benchmark script in this folder (each in its own subprocess) and print their JSON.

Each script prints one JSON object on stdout; this prints one JSON object mapping script
name to that object (or to {"error": ..., "returncode": ...} when a script fails), so a
failing benchmark does not hide the others. Extra arguments (e.g. `--model tiny-llama`)
are passed to every script. Exit status 1 if any script failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))


def main() -> int:
    results, failed = {}, False
    for script in scripts():
        print(f"[bench] {script.name} ...", file=sys.stderr, flush=True)
        started = time.time()
        proc = subprocess.run([sys.executable, str(script), *sys.argv[1:]], stdout=subprocess.PIPE, text=True,
                              cwd=HERE.parent)
        lines = [x for x in proc.stdout.splitlines() if x.strip()]
        try:
            results[script.stem] = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
        except json.JSONDecodeError:
            results[script.stem] = None
        if results[script.stem] is None:
            failed = True
            results[script.stem] = {"error": "no JSON on stdout", "returncode": proc.returncode,
                                    "stdout_tail": proc.stdout[-2000:]}
        print(f"[bench] {script.name}: rc {proc.returncode}, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

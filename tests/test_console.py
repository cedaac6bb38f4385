"""The quiet console (console.py), in a fresh interpreter as a command would run: library log
records, Python warnings and untagged worker lines go to the log file; the project's tagged lines
and errors stay on the console; with --verbose (LMFLOW_RAY_VERBOSE=1) everything stays on the console."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import logging, sys, warnings
from lmflow_ray import console

console.configure(verbose=False)
lib = logging.getLogger("somelib")  # a library configuring its own console handler after we start
lib.addHandler(logging.StreamHandler(sys.stderr))
lib.propagate = False
lib.warning("library warning line")
warnings.warn("a python warning line", FutureWarning)
print("[lmflow-ray] step 1/2 loss 1.0", flush=True)
console._worker_lines({"pid": 7, "actor_name": "RayTrainWorker", "is_err": False,
                       "lines": ["[lmflow-ray] step 2/2 loss 0.5", "Loading weights: 100%", "noise from a worker"]})
console._worker_lines({"pid": "autoscaler", "lines": ["status table line", ":event_summary:Adding 1 node(s)"]})
console.log_to(sys.argv[1])
logging.getLogger("ray").warning("ray warning after the log dir is known")
"""


def run(tmp_path, verbose: bool):
    env = {**os.environ, "LMFLOW_RAY_VERBOSE": "1" if verbose else "0"}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "logs")], capture_output=True, text=True,
                          env=env, timeout=120)


def test_quiet_console_keeps_our_lines_and_logs_the_rest(tmp_path):
    proc = run(tmp_path, verbose=False)
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["[lmflow-ray] step 1/2 loss 1.0", "[lmflow-ray] step 2/2 loss 0.5"], shown
    assert proc.stderr == ""
    log = (tmp_path / "logs" / "console.log").read_text()
    for line in ("library warning line", "a python warning line", "(RayTrainWorker pid=7) Loading weights: 100%",
                 "(RayTrainWorker pid=7) noise from a worker", "(autoscaler) Adding 1 node(s)",
                 "ray warning after the log dir is known"):
        assert line in log, line
    assert "status table line" not in log  # the autoscaler's periodic status, as Ray itself filters it


def test_verbose_console_shows_everything(tmp_path):
    proc = run(tmp_path, verbose=True)
    assert proc.returncode == 0, proc.stderr
    assert "library warning line" in proc.stderr and "a python warning line" in proc.stderr
    assert not (tmp_path / "logs").exists()

"""What reaches the terminal: quiet by default.

The console shows the project's own lines (progress: step, loss, tokens/s, ETA; iterations,
reward, KL; stage banners; summaries) and errors. Everything else — Ray's, DeepSpeed's,
transformers', vLLM's warnings and log records, Python warnings, and every other line Ray
workers print — goes to a log file: OUT/logs/console.log for a command with an output dir
(the pipeline's OUT/logs/ for all its stages), else a file under the temp dir named when the
command fails. `--verbose` (or LMFLOW_RAY_VERBOSE=1) shows it all on the console as before.

How: library loggers' console handlers are swapped for the log file (for loggers created later
too, through the logger class), Python warnings are captured, progress bars of transformers /
huggingface_hub / tqdm are turned off (also in the workers of a Ray cluster this command starts,
which inherit this environment), and the lines Ray forwards from workers are split: ours (they
carry a project tag) to the console, the rest to the log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

# Lines of the project carry one of these tags (workers print them; Ray forwards them).
TAGS = ("[lmflow-ray]", "[pipeline]", "[demo]")

_state = {"quiet": False, "file": None, "path": None, "pending": []}


class _ToLog(logging.Handler):
    """A handler writing into the current log file (lines are held until a log dir is known)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_log(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


_HANDLER = _ToLog()
_HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


def quiet() -> bool:
    return _state["quiet"]


def write_log(text: str) -> None:
    if _state["file"] is None:
        _state["pending"].append(text)
        del _state["pending"][:-5000]  # bounded until a log dir is known
    else:
        _state["file"].write(text.rstrip("\n") + "\n")
        _state["file"].flush()


def log_to(directory: str | os.PathLike) -> Path | None:
    """Send the log to `directory`/console.log (appended), unless a log file is already open (a pipeline's
    OUT/logs holds all its stages). Returns the file in use; None in verbose mode."""
    if not _state["quiet"]:
        return None
    if _state["file"] is None:
        path = Path(directory) / "console.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        _state["file"], _state["path"] = open(path, "a"), path
        _state["file"].write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        for text in _state["pending"]:
            write_log(text)
        _state["pending"].clear()
    return _state["path"]


def log_path() -> Path | None:
    """Where the log went (opening a temp one if no command named a dir); None in verbose mode."""
    if _state["quiet"] and _state["file"] is None:
        log_to(tempfile.mkdtemp(prefix="lmflow-ray-logs-"))
    return _state["path"]


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
        and getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def _reroute(logger: logging.Logger) -> None:
    if logger.name.startswith("lmflow_ray"):
        return
    console = [h for h in logger.handlers if _is_console(h)]
    for h in console:
        logger.removeHandler(h)
    if console and _HANDLER not in logger.handlers:
        logging.Logger.addHandler(logger, _HANDLER)


class _QuietLogger(logging.Logger):
    """Loggers created after `configure`: a console handler a library adds goes to the log file instead."""

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 - logging's name
        super().addHandler(hdlr)
        if _state["quiet"]:
            _reroute(self)


def sweep() -> None:
    """Move every library logger's console handlers to the log file (loggers that existed before)."""
    if not _state["quiet"]:
        return
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            _reroute(logger)


# Progress bars and import-time chatter off, here and in the workers of a Ray cluster this process starts.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "WANDB_SILENT": "true"}


def _no_accelerator() -> bool:
    return not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/accel", "/dev/neuron0"))


def configure(verbose: bool = False) -> None:
    """Set the console mode for this process; call before heavy imports (idempotent)."""
    verbose = verbose or os.environ.get("LMFLOW_RAY_VERBOSE", "") not in ("", "0")
    if _state["file"] is not None:  # a second command in this process (tests) starts its own log
        _state["file"].close()
    _state.update(quiet=not verbose, file=None, path=None, pending=[])
    if verbose:
        return
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if _no_accelerator():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns on import that it fell back to CPU
    logging.setLoggerClass(_QuietLogger)
    logging.captureWarnings(True)
    root = logging.getLogger()
    for h in [h for h in root.handlers if _is_console(h)]:
        root.removeHandler(h)
    if _HANDLER not in root.handlers:
        root.addHandler(_HANDLER)
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))
    sweep()


def attach_ray() -> None:
    """After ray.init in this process: worker lines with a project tag to the console, the rest to the log."""
    if not _state["quiet"]:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    sweep()
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("lmflow_console")
    dispatcher.add_handler("lmflow_console", _worker_lines)


def _worker_lines(data: dict) -> None:
    who = data.get("actor_name") or data.get("task_name") or "worker"
    prefix = f"({who} pid={data.get('pid')}) "
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its status table every few seconds; only its events, as Ray shows them
        prefix, lines = "(autoscaler) ", [line.replace(":event_summary:", "") for line in lines if ":event_summary:" in line]
    for line in lines:
        if any(tag in line for tag in TAGS):
            print(line[line.index(next(t for t in TAGS if t in line)):], flush=True)
        write_log(prefix + line)


@contextlib.contextmanager
def captured():
    """In quiet mode, everything written to this process's stdout / stderr (Python and the file descriptors a
    library or its subprocesses write to, e.g. progress bars) goes to the log file meanwhile."""
    if not _state["quiet"]:
        yield
        return
    path = log_path()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])

"""Keep optional packages out of imports that do not need them.

Every process of a run (the CLI, each Ray Train worker, each actor and Serve replica) pays for
what its libraries import at start-up. Two imports of installed extras cost every such process
CPU time and memory for features our runs never touch:

- transformers' assisted-decoding module imports scikit-learn (`sklearn.metrics.roc_curve`,
  pulled in by `lm-eval`, the `harness` extra) whenever any model class is loaded: ~0.8 s of CPU
  and ~100 MB of RSS per process. `install()` hides scikit-learn while that one module executes
  and gives it a `roc_curve` that imports scikit-learn on first call, so assisted decoding with
  a confidence threshold behaves as before.
- DeepSpeed's autotuner imports MLflow (the `tracking` extra): ~1.1 s of CPU per training
  process. `hidden("mlflow")` around `import deepspeed` (train/step.py).

`install()` runs when `lmflow_ray` is imported; it adds one import hook and imports nothing.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys

_TARGET = "transformers.generation.candidate_generator"


@contextlib.contextmanager
def hidden(name: str):
    """`import NAME` raises ImportError meanwhile (unless NAME is already imported)."""
    hide = name not in sys.modules
    if hide:
        sys.modules[name] = None
    try:
        yield
    finally:
        if hide and name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


def _roc_curve(*args, **kwargs):
    from sklearn.metrics import roc_curve

    return roc_curve(*args, **kwargs)


class _SklearnOnDemand(importlib.abc.MetaPathFinder):
    """Finds transformers' candidate_generator as usual and runs it with scikit-learn hidden."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with hidden("sklearn"):
                run(module)
            if "roc_curve" not in vars(module):
                module.roc_curve = _roc_curve

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _TARGET not in sys.modules and not any(isinstance(f, _SklearnOnDemand) for f in sys.meta_path):
        sys.meta_path.insert(0, _SklearnOnDemand())

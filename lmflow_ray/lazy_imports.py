"""Keep optional packages out of imports that do not need them.

Every process of a run (the CLI, each Ray Train worker, each actor and Serve replica) pays for
what its libraries import at start-up. Two imports of installed extras cost every such process
CPU time and memory for features our runs never touch:

- transformers' assisted-decoding module imports scikit-learn (`sklearn.metrics.roc_curve`) and
  its object-detection losses import SciPy (`scipy.optimize.linear_sum_assignment`) whenever any
  model class is loaded, both pulled in by `lm-eval` (the `harness` extra): ~1.1 s of CPU and
  ~110 MB of RSS per process. `install()` runs those modules against a stub of the package whose
  only content is the function they import, a stand-in that imports the real package on first
  call (the stub is removed afterwards), so assisted decoding with a confidence threshold and
  DETR-style losses behave as before.
- DeepSpeed's autotuner imports MLflow (the `tracking` extra): ~1.1 s of CPU per training
  process. `hidden("mlflow")` around `import deepspeed` (train/step.py).

`install()` runs when `lmflow_ray` is imported; it adds one import hook and imports nothing.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys

# module (or package prefix) -> (the module it imports from, the names it takes)
_ON_DEMAND = {
    "transformers.generation.candidate_generator": ("sklearn.metrics", ("roc_curve",)),
    "transformers.loss.": ("scipy.optimize", ("linear_sum_assignment",)),
}


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


def _stand_in(name: str, where: str):
    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(where), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


@contextlib.contextmanager
def _stubbed(where: str, names: tuple[str, ...]):
    """`from WHERE import NAME` gives stand-ins meanwhile, unless WHERE's package is already imported."""
    import types

    parts = where.split(".")
    if parts[0] in sys.modules:  # the real package (or an outer stub) is there: leave it
        yield
        return
    stubs = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        stub = types.ModuleType(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=i < len(parts))
        stub.__path__ = []
        sys.modules[name] = stub
        stubs.append(stub)
        if i > 1:
            setattr(stubs[-2], parts[i - 1], stub)
    for n in names:
        setattr(stubs[-1], n, _stand_in(n, where))
    try:
        yield
    finally:
        for stub in stubs:
            if sys.modules.get(stub.__name__) is stub:
                del sys.modules[stub.__name__]


def _rule(module: str):
    for key, rule in _ON_DEMAND.items():
        if module == key or (key.endswith(".") and module.startswith(key)):
            return rule
    return None


class _OnDemand(importlib.abc.MetaPathFinder):
    """Finds the modules of `_ON_DEMAND` as usual and runs each against its stub."""

    def find_spec(self, name, path, target=None):
        rule = _rule(name)
        if rule is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with _stubbed(*rule):
                run(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Add the import hook (once); it imports nothing itself."""
    if not any(isinstance(f, _OnDemand) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnDemand())

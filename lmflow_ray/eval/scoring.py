"""Metrics that score a dataset's own text with the model (no generation), and answer matching.

- nll / ppl: the summed negative log-likelihood of the learned tokens, as training masks them
  (text_only: every token; text2text: the output and its end token; conversation: the assistant
  turns and their end-of-turn tokens), per instance and over the dataset; ppl = exp(total NLL /
  total tokens). Instances are cut to `max_length` tokens as training cuts them.
- multiple choice (`multiple_choice` data: input, choices, answer): the log-likelihood of
  " " + choice after the input, for every choice, as lm-evaluation-harness scores its
  multiple-choice tasks (no chat template; the same target delimiter). `acc` picks the choice
  with the highest log-likelihood, `acc_norm` the highest log-likelihood per character of the
  choice (the harness's length normalisation).
- exact match: a generated answer equals the reference after `normalize_answer` (surrounding
  whitespace removed, inner runs of whitespace collapsed to one space; case kept).
"""

from __future__ import annotations

from lmflow_ray.data.tokenize import CHOICE_DELIMITER as TARGET_DELIMITER  # the harness's default, and training's


def normalize_answer(text: str) -> str:
    return " ".join(text.split())


def reference_of(dtype: str, inst: dict) -> str | None:
    """The answer an instance expects: a text2text output, a conversation's last assistant turn."""
    if dtype == "text2text":
        return inst["output"]
    if dtype == "conversation":
        answers = [m["content"] for m in inst["messages"] if m.get("role") == "assistant"]
        return answers[-1] if answers else None
    return None


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def dataset_nll(model, tokenizer, dtype: str, rows: list[dict], template: str | None, max_length: int | None,
                batch_size: int) -> list[tuple[float, int]]:
    """(summed NLL, learned tokens) of each normalised row (data.formats.normalize), in order."""
    import torch

    from lmflow_ray.data.collate import collate
    from lmflow_ray.data.tokenize import tokenize_row
    from lmflow_ray.models.scoring import token_logps

    out: list[tuple[float, int]] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for chunk in _batches(rows, batch_size):
        examples = [tokenize_row(r, dtype, tokenizer, template, max_length) for r in chunk]
        batch = collate({"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}, pad)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(model.device),
                           attention_mask=batch["attention_mask"].to(model.device)).logits
        logps, mask = token_logps(logits, batch["labels"].to(model.device))
        for lp, m in zip(logps, mask):
            out.append((float(-lp[m].double().sum()), int(m.sum())))
    return out


def choice_loglikelihoods(model, tokenizer, rows: list[dict], batch_size: int) -> list[list[float]]:
    """For each multiple-choice row, log p(" " + choice | input) of every choice."""
    import torch

    from lmflow_ray.data.collate import collate
    from lmflow_ray.models.scoring import token_logps

    pairs = [(i, r["input"], TARGET_DELIMITER + c) for i, r in enumerate(rows) for c in r["choices"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[float] = []
    for chunk in _batches(pairs, batch_size):
        ids, labels = [], []
        for _, context, continuation in chunk:
            # As the harness encodes a pair: trailing spaces of the context move to the continuation; the
            # continuation's tokens are those of the whole string after the context's token count; an empty
            # context becomes the prefix token (BOS, else EOS).
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            prefix = [] if n_ctx else [tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                       else tokenizer.eos_token_id]
            ids.append(prefix + whole)
            labels.append([-100] * (len(prefix) + n_ctx) + whole[n_ctx:])
        batch = collate({"input_ids": ids, "labels": labels}, pad)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(model.device),
                           attention_mask=batch["attention_mask"].to(model.device)).logits
        logps, mask = token_logps(logits, batch["labels"].to(model.device))
        scores += [float(lp[m].double().sum()) for lp, m in zip(logps, mask)]
    out: list[list[float]] = [[] for _ in rows]
    for (i, _, _), s in zip(pairs, scores):
        out[i].append(s)
    return out


def multiple_choice_accuracy(rows: list[dict], logliks: list[list[float]]) -> tuple[dict, list[dict]]:
    """({acc, acc_norm}, per-row details) from each row's choice log-likelihoods."""
    samples, acc, acc_norm = [], 0, 0
    for r, ll in zip(rows, logliks):
        pick = max(range(len(ll)), key=lambda j: ll[j])
        norm = [x / len(c) for x, c in zip(ll, r["choices"])]
        pick_norm = max(range(len(norm)), key=lambda j: norm[j])
        acc += pick == r["answer"]
        acc_norm += pick_norm == r["answer"]
        samples.append({"input": r["input"], "choices": r["choices"], "answer": r["answer"], "loglikelihoods": ll,
                        "pick": pick, "pick_norm": pick_norm})
    n = max(len(rows), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n}, samples


class ScoreWorker:
    """A Ray Data actor for `eval --workers N`: loads the model once, scores many batches of rows."""

    def __init__(self, model: str, dtype: str, template: str | None, max_length: int | None, batch_size: int):
        from lmflow_ray.models.loading import load_for_generation

        self.lm, self.tok = load_for_generation(model)
        self.dtype, self.template, self.max_length, self.batch_size = dtype, template, max_length, batch_size

    def __call__(self, batch: dict) -> dict:
        import json

        from lmflow_ray.data.tokenize import batch_rows

        rows = batch_rows(batch, self.dtype, for_training=False)
        if self.dtype == "multiple_choice":
            lls = choice_loglikelihoods(self.lm, self.tok, rows, self.batch_size)
            return {"row": [json.dumps(r) for r in rows], "loglikelihoods": [json.dumps(x) for x in lls]}
        scored = dataset_nll(self.lm, self.tok, self.dtype, rows, self.template, self.max_length, self.batch_size)
        return {"row": [json.dumps(r) for r in rows], "nll_sum": [n for n, _ in scored], "tokens": [c for _, c in scored]}


def score_with_ray(model: str, data: str, dtype: str, template: str | None, max_length: int | None, batch_size: int,
                   workers: int, cpus_per_worker: float = 1.0):
    """Yield (row, result) in dataset order, scored by `workers` model actors over Ray Data: result is
    (nll_sum, tokens) or, for multiple_choice, the choices' log-likelihoods."""
    import json

    import ray

    from lmflow_ray.data.reader import read_dataset
    from lmflow_ray.runtime import init_ray

    init_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = read_dataset(data, dtype)[0].map_batches(
        ScoreWorker, fn_constructor_kwargs={"model": str(model), "dtype": dtype, "template": template,
                                            "max_length": max_length, "batch_size": batch_size},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
        batch_format="numpy")
    for out in ds.iter_rows():
        row = json.loads(out["row"])
        yield row, (json.loads(out["loglikelihoods"]) if dtype == "multiple_choice"
                    else (float(out["nll_sum"]), int(out["tokens"])))

"""`lmflow-ray vocab extend`: new tokens for a domain, learned from its corpus, added to a model.

1. A tokenizer of the base tokenizer's own kind (same normaliser, pre-tokeniser and model type) is
   trained on the corpus (`train_new_from_iterator`, HF tokenizers).
2. Its pieces that the base vocabulary lacks are ranked by how often they occur when the corpus
   is tokenized with it; the `new_tokens` most frequent become added tokens of the base tokenizer
   (matched before the base model splits the rest, so text without them tokenizes as before).
3. The input embeddings and an untied LM head grow to the new vocabulary (rounded up to a multiple
   of 64); each new row is the mean of the base rows of the pieces the base tokenizer splits that
   token into (not random: the model starts by reading the token as it read its pieces).
4. Model and tokenizer are saved as one HF directory that every command (finetune, infer, serve,
   vLLM) loads; vocab.json beside them records the added tokens and the corpus's token counts.

The corpus: a text file (.txt, one document per line or free text) or an LMFlow text_only dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from lmflow_ray.errors import UserError


def read_corpus(path: str | Path) -> list[str]:
    """The corpus's documents: lines of a text file, or the `text` of an LMFlow text_only dataset."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--corpus {p}: no such file or directory")
    if p.suffix in (".json", ".jsonl", ".parquet", ".arrow") or p.is_dir():
        from lmflow_ray.data.source import resolve, validate

        summary = validate(p)
        if summary.type != "text_only":
            raise UserError(f"--corpus {p}: an LMFlow dataset must be text_only, not '{summary.type}'")
        docs = [inst["text"] for inst in resolve(p).instances()]
    else:
        try:
            docs = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"--corpus {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"--corpus {p}: empty (no text to learn tokens from)")
    return docs


def candidate_tokens(tokenizer, docs: list[str], new_tokens: int) -> list[tuple[str, int]]:
    """(token text, corpus count) of up to `new_tokens` domain pieces the base vocabulary lacks, most frequent first."""
    size = len(tokenizer) + max(4 * new_tokens, 256)
    domain = tokenizer.train_new_from_iterator(docs, vocab_size=size, show_progress=False)
    base_vocab = tokenizer.get_vocab()
    counts: Counter = Counter()
    for enc in domain(docs, add_special_tokens=False)["input_ids"]:
        counts.update(enc)
    specials = set(domain.all_special_ids)
    out = []
    for token_id, n in counts.most_common():
        piece = domain.convert_ids_to_tokens(token_id)
        if token_id in specials or piece in base_vocab:
            continue
        text = domain.decode([token_id])
        # Whole pieces only: at least two characters besides spaces, and the base tokenizer splits them.
        if len(text.strip()) < 2 or text in out or len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 2:
            continue
        out.append((text, n))
        if len(out) == new_tokens:
            break
    return out


def extend_vocabulary(model: str, corpus: str, new_tokens: int, out: str | Path) -> dict:
    import torch
    from tokenizers import AddedToken

    from lmflow_ray.models.loading import load_causal_lm, load_tokenizer
    from lmflow_ray.models.zoo import is_adapter, resolve_model

    if new_tokens <= 0:
        raise UserError(f"--new-tokens must be >= 1, got {new_tokens}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory; choose a new one")
    path = resolve_model(model)
    if is_adapter(path):
        raise UserError(f"--model {model} is a LoRA adapter; merge it first (lmflow-ray merge-lora) and extend the result")
    docs = read_corpus(corpus)
    tok = load_tokenizer(path)
    if not tok.is_fast:
        raise UserError(f"--model {model}: its tokenizer is not a fast (HF tokenizers) one; vocabulary extension "
                        "trains a tokenizer of the same kind and needs tokenizer.json")
    before = sum(len(ids) for ids in tok(docs, add_special_tokens=False)["input_ids"])
    chosen = candidate_tokens(tok, docs, new_tokens)
    if not chosen:
        raise UserError(f"--corpus {corpus}: no piece of it is missing from the base vocabulary")
    # How the base tokenizer splits each new token: its embedding starts as the mean of those pieces'.
    pieces = [tok(text, add_special_tokens=False)["input_ids"] for text, _ in chosen]
    old_size = len(tok)
    tok.add_tokens([AddedToken(text, normalized=False, special=False) for text, _ in chosen])
    lm = load_causal_lm(path)
    tied = bool(getattr(lm.config.get_text_config(), "tie_word_embeddings", False))
    lm.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        head = None if tied else lm.get_output_embeddings().weight
        for i, ids in enumerate(pieces):
            emb[old_size + i] = emb[ids].mean(0)
            if head is not None:
                head[old_size + i] = head[ids].mean(0)
    after = sum(len(ids) for ids in tok(docs, add_special_tokens=False)["input_ids"])
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {"base": str(path), "corpus": str(corpus), "documents": len(docs), "added": len(chosen),
            "tokens": [{"text": t, "corpus_count": n, "base_pieces": len(p)} for (t, n), p in zip(chosen, pieces)],
            "corpus_tokens_before": before, "corpus_tokens_after": after,
            "tokens_ratio": after / before, "chars": sum(len(d) for d in docs),
            "vocab_size": len(tok), "embedding_rows": lm.get_input_embeddings().weight.shape[0], "tied_head": tied}
    (tmp / "vocab.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return info

"""Reading LMFlow files into Ray Data, end to end: files → rows → tokens → back to text.

The round trips decode the tokenized rows with the tiny-llama tokenizer and check that
the texts come back and that exactly the assistant turns (plus their `<|im_end|>`) are
learned, so a reader that dropped, duplicated or mangled rows would fail here. Large
.jsonl files are read in byte ranges; those ranges must cover every line exactly once.
Real Ray (the session fixture from conftest.py) except where a test says otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from lmflow_ray.data import reader
from lmflow_ray.data.formats import normalize
from lmflow_ray.data.reader import read_dataset
from lmflow_ray.data.source import resolve
from lmflow_ray.data.tokenize import IGNORE_INDEX
from lmflow_ray.train.data import _tokenize

END = "<|im_end|>"  # tiny-llama's end of turn and eos token

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Where does the king find the red ball?"},
                  {"role": "assistant", "content": "The king finds the red ball at the market."}]},
    {"system": "Be kind.",
     "messages": [{"role": "user", "content": "What does the dog follow?"},
                  {"role": "assistant", "content": "The dog follows a tall horse."},
                  {"role": "user", "content": "And the cat?"},
                  {"role": "assistant", "content": "The cat sleeps in the garden."}]},
    {"messages": [{"role": "user", "content": "Who paints the old clock?"},
                  {"role": "assistant", "content": "A child paints the old clock."},
                  {"role": "user", "content": "This trailing question has no answer."}]},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


def write_dataset(path: Path, dtype: str, instances: list) -> Path:
    path.write_text(json.dumps({"type": dtype, "instances": instances}, indent=1))
    return path


def tokenized_rows(path: Path, dtype: str | None, tiny_llama: Path) -> tuple[str, list[dict]]:
    ds, dtype = read_dataset(path, dtype)
    ds = ds.map_batches(_tokenize, fn_args=(dtype, str(tiny_llama), None, None), batch_format="numpy",
                        batch_size=64)
    return dtype, ds.take_all()


def learned_spans(row: dict, tokenizer) -> list[str]:
    """Decoded text of each contiguous run of learned tokens."""
    spans, run = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(int(token))
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


def check_conversation_rows(rows: list[dict], instances: list[dict], tokenizer) -> None:
    assert len(rows) == len(instances)
    texts = [tokenizer.decode([int(t) for t in row["input_ids"]]) for row in rows]
    for inst in instances:
        conv = normalize("conversation", inst)
        first_user = conv["messages"][0]["content"]
        (i,) = [i for i, text in enumerate(texts) if first_user in text]  # exactly one row per instance
        for part in [conv["system"], *(m["content"] for m in conv["messages"])]:
            assert part in texts[i]
        assistants = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
        assert learned_spans(rows[i], tokenizer) == [a + END for a in assistants]
        if inst["messages"][-1]["role"] == "user":  # trimmed: its text must not be in the row
            assert inst["messages"][-1]["content"] not in texts[i]


def test_conversation_json_round_trip(ray_session, tmp_path, tiny_llama, tokenizer):
    dtype, rows = tokenized_rows(write_dataset(tmp_path / "c.json", "conversation", CONVERSATIONS), None, tiny_llama)
    assert dtype == "conversation"
    check_conversation_rows(rows, CONVERSATIONS, tokenizer)


def test_directory_of_two_files_round_trip(ray_session, tmp_path, tiny_llama, tokenizer):
    write_dataset(tmp_path / "a.json", "conversation", CONVERSATIONS[:1])
    write_dataset(tmp_path / "b.json", "conversation", CONVERSATIONS[1:])
    _, rows = tokenized_rows(tmp_path, None, tiny_llama)
    check_conversation_rows(rows, CONVERSATIONS, tokenizer)


def test_text2text_json_round_trip(ray_session, tmp_path, tiny_llama, tokenizer):
    pairs = [{"input": f"Question {i}: where is the red ball?", "output": f"Answer {i}: by the sea."} for i in range(5)]
    _, rows = tokenized_rows(write_dataset(tmp_path / "t.json", "text2text", pairs), None, tiny_llama)
    decoded = sorted(tokenizer.decode([int(t) for t in r["input_ids"]]) for r in rows)
    assert decoded == sorted(f"<s>{p['input']}{p['output']}{END}" for p in pairs)
    assert sorted(span for r in rows for span in learned_spans(r, tokenizer)) == sorted(p["output"] + END for p in pairs)


def test_text_only_jsonl_round_trip(ray_session, tmp_path, tiny_llama, tokenizer):
    docs = [f"Document {i}. The farmer finds the green tree in the garden." for i in range(7)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    dtype, rows = tokenized_rows(path, "text_only", tiny_llama)
    assert dtype == "text_only"
    assert sorted(tokenizer.decode([int(t) for t in r["input_ids"]]) for r in rows) == sorted(f"<s>{d}{END}" for d in docs)
    assert all(np.array_equal(r["input_ids"], r["labels"]) for r in rows)  # pretraining learns every token


# ----------------------------------------------------------------------------- .jsonl byte ranges


def jsonl_with_awkward_lines(path: Path, n: int) -> list[str]:
    """n instances of varied length with multi-byte characters and blank lines; no final newline."""
    texts = [f"{i} " + "é☃𝄞 word " * (i % 13) for i in range(n)]
    lines = [json.dumps({"text": t}, ensure_ascii=False) + ("\n\n" if i % 7 == 0 else "\n") for i, t in enumerate(texts)]
    path.write_text("".join(lines).rstrip("\n"), encoding="utf-8")
    return texts


@pytest.mark.parametrize("split", [1, 7, 64, 333, 2_000, 1 << 30])
def test_jsonl_byte_ranges_cover_every_line_once(tmp_path, split):
    # No Ray: the range reader itself, with ranges that start inside lines and inside characters.
    path = tmp_path / "d.jsonl"
    texts = jsonl_with_awkward_lines(path, 120)
    size = path.stat().st_size
    got = [inst["text"] for start in range(0, size, split)
           for _, _, inst in reader._jsonl_range(path, start, min(size, start + split))]
    assert sorted(got) == sorted(texts) and len(got) == len(texts)


def test_large_jsonl_read_in_several_ranges(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "JSONL_SPLIT_BYTES", 2_000)
    path = tmp_path / "big.jsonl"
    texts = jsonl_with_awkward_lines(path, 400)
    tasks = reader._make_read_tasks(resolve(path, "text_only"), reader.ROWS_PER_BLOCK)
    assert len(tasks) == -(-path.stat().st_size // 2_000) > 10
    ds, _ = read_dataset(path, "text_only")
    assert sorted(ds.to_pandas()["text"]) == sorted(texts)


# ----------------------------------------------------------------------------- data stats


def expected_lengths(instances: list[dict], dtype: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (total, learned) token counts computed in-process, without Ray."""
    from lmflow_ray.data.tokenize import tokenize_batch

    rows = [normalize(dtype, inst) for inst in instances]
    batch = {key: [row[key] for row in rows] for key in rows[0]}
    out = tokenize_batch(batch, dtype, tokenizer, None, None)
    learned = [sum(1 for x in labels if x != IGNORE_INDEX) for labels in out["labels"]]
    return np.array([len(ids) for ids in out["input_ids"]]), np.array(learned)


def test_cli_stats_on_sft_tiny(ray_session, tokenizer, capsys):
    from lmflow_ray.cli import main

    assert main(["data", "stats", str(REPO / "examples/data/sft_tiny.json"), "--model", "tiny-llama"]) == 0
    stats = json.loads(capsys.readouterr().out)
    instances = json.loads((REPO / "examples/data/sft_tiny.json").read_text())["instances"]
    lengths, learned = expected_lengths(instances, "conversation", tokenizer)
    assert (stats["type"], stats["instances"], stats["tokens_total"]) == ("conversation", len(instances), lengths.sum())
    length = stats["length"]
    assert length["min"] <= length["p50"] <= length["p90"] <= length["p95"] <= length["p99"] <= length["max"]
    assert (length["min"], length["max"]) == (lengths.min(), lengths.max())
    assert length["p50"] == np.percentile(lengths, 50, method="higher")
    assert length["p99"] == np.percentile(lengths, 99, method="higher")
    assert stats["learned_tokens_mean"] == pytest.approx(learned.mean(), abs=0.01)


def test_stats_text_only_jsonl_in_process(ray_session, tmp_path, tiny_llama, tokenizer):
    from lmflow_ray.data.stats import token_length_stats

    docs = [{"text": "The king sees the tree. " * (1 + i % 9)} for i in range(300)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    stats = token_length_stats(path, str(tiny_llama), dtype="text_only")
    lengths, _ = expected_lengths(docs, "text_only", tokenizer)
    assert (stats["instances"], stats["tokens_total"], stats["length"]["max"]) == (300, lengths.sum(), lengths.max())
    assert stats["learned_tokens_mean"] == stats["length"]["mean"]  # text_only learns every token


def test_cli_stats_unknown_template_exit_2(cli):
    proc = cli("data", "stats", "examples/data/sft_tiny.json", "--model", "tiny-llama", "--template", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown conversation template 'nope'")


# ----------------------------------------------------------------------------- memory


@pytest.mark.e2e
def test_validate_1m_instances_streams_in_bounded_memory():
    """validate() on a 1,000,000-instance (~100 MB) file holds one instance at a time.

    Measured on the 2-core / 24 GiB machine (BENCHMARKS.md): the interpreter alone peaks at
    ~16 MB, validate at ~17 MB, json.load at ~460 MB. The bound, the floor + 50 MB, is loose
    enough for allocator noise and tight enough to catch any regression that keeps the
    instances (or even just their texts, ~95 MB) in memory, which a bound proportional to
    the file size (say 40% of it + 150 MB) would let through.
    """
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/data_memory.py"), "--instances", "1000000",
                           "--steps", "idle,validate_json,json_load"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["validate_json"]["instances"] == 1_000_000 and report["json_mb"] > 90
    assert report["validate_json"]["peak_rss_mb"] < report["idle"]["peak_rss_mb"] + 50
    assert report["validate_json"]["peak_rss_mb"] < 0.2 * report["json_load"]["peak_rss_mb"]

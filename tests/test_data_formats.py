"""Data in the shapes people keep it: OpenAI chat, ShareGPT, Alpaca, preference columns, in JSONL,
JSON arrays, Parquet, Arrow and `datasets.save_to_disk` directories, mapped onto LMFlow types.

Each dataset is generated here (with `datasets` / pyarrow, no download). Checked: the mapping
(validate's type and count, convert's LMFlow instances), every bad input as one line naming the
file, row and field with exit status 2 and nothing written, Ray Data rows and `data stats` equal
to the LMFlow JSON's. Training straight from these files rides on runs the suite makes anyway:
tests/test_finetune.py::test_loss_is_mean_over_global_batch_tokens (an SFT run from a
save_to_disk directory has the hand-computed first-step loss of the LMFlow JSON instances) and
tests/test_alignment.py::test_dpo_raises_the_heldout_logp_margin (a DPO run from Parquet with
renamed columns logs the LMFlow JSON run's first-step and held-out log-prob margins).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmflow_ray.data.source import DataError, validate

SYSTEM = "Answer briefly."
OPENAI_ROWS = [
    {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4."}]},
    {"messages": [{"role": "developer", "content": SYSTEM},
                  {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "c1", "type": "function",
                                   "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "rain, 7C"},
                  {"role": "assistant", "content": "Rain and 7C."}],
     "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]},
]
SHAREGPT_ROWS = [
    {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "Hi?"},
                       {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye?"},
                       {"from": "gpt", "value": "Bye."}]},
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
]
ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
    {"instruction": "Say hello.", "input": "", "output": "Hello."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def converted(cli, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"converted{len(list(tmp_path.glob('converted*')))}.json"
    proc = cli("data", "convert", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- shapes -> LMFlow


def test_openai_chat_with_system_content_parts_and_tool_calls(tmp_path, cli):
    got = converted(cli, tmp_path, str(write_jsonl(tmp_path / "chat.jsonl", OPENAI_ROWS)))
    assert got["type"] == "conversation" and len(got["instances"]) == 2
    first, second = got["instances"]
    assert first == {"system": SYSTEM, "tools": "", "messages": [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]}
    assert second["system"] == SYSTEM and json.loads(second["tools"])[0]["function"]["name"] == "weather"
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert second["messages"][0]["content"] == "Weather in Oslo?"
    assert json.loads(second["messages"][1]["content"]) == {"name": "weather", "arguments": {"city": "Oslo"}}


def test_sharegpt_json_array_and_alpaca_map_to_conversations(tmp_path, cli):
    share = tmp_path / "share.json"
    share.write_text(json.dumps(SHAREGPT_ROWS))
    got = converted(cli, tmp_path, str(share))
    assert got["type"] == "conversation"
    assert got["instances"][0]["system"] == SYSTEM
    assert [m["content"] for m in got["instances"][0]["messages"]] == ["Hi?", "Hello.", "Bye?", "Bye."]

    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    conv = converted(cli, tmp_path, str(alpaca))
    assert conv["type"] == "conversation"
    assert conv["instances"][0]["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                                                {"role": "assistant", "content": "4"}]
    t2t = converted(cli, tmp_path, str(alpaca), "--type", "text2text")
    assert t2t["instances"][1] == {"input": "Say hello.", "output": "Hello."}


def test_parquet_arrow_and_save_to_disk_with_renamed_columns(tmp_path, cli):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"question": ["Say hi", "Say bye"], "good": ["Hi", "Bye"], "bad": ["Go away", "Stay"]}
    pq.write_table(pa.table(rows), tmp_path / "pairs.parquet")
    with pa.OSFile(str(tmp_path / "pairs.arrow"), "wb") as sink, pa.ipc.new_file(sink, pa.table(rows).schema) as w:
        w.write_table(pa.table(rows))
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "pairs_hf"))
    expected = [{"prompt": "Say hi", "chosen": "Hi", "rejected": "Go away", "margin": 0.0},
                {"prompt": "Say bye", "chosen": "Bye", "rejected": "Stay", "margin": 0.0}]
    for name in ("pairs.parquet", "pairs.arrow", "pairs_hf"):
        got = converted(cli, tmp_path, str(tmp_path / name), "--columns", "prompt=question,chosen=good,rejected=bad")
        assert got == {"type": "paired_text_to_text", "instances": expected}, name
    # The same pairs as conversations (what DPO on a chat model wants).
    conv = converted(cli, tmp_path, str(tmp_path / "pairs_hf"), "--type", "paired_conversation",
                     "--columns", "prompt=question", "--columns", "chosen=good,rejected=bad")
    assert conv["instances"][0]["chosen"]["messages"] == [{"role": "user", "content": "Say hi"},
                                                         {"role": "assistant", "content": "Hi"}]


def test_trl_conversational_preference_rows(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "Capital of France?"}],
             "chosen": [{"role": "assistant", "content": "Paris."}],
             "rejected": [{"role": "assistant", "content": "Rome."}]},
            {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
             "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    summary = validate(path)
    assert (summary.type, summary.instances) == ("paired_conversation", 2)


def test_a_hub_name_without_the_hub_is_one_line_saying_what_to_do(tmp_path, hub_offline):
    from lmflow_ray.config import DataConfig

    spec = DataConfig.model_validate({"hf": "org/some-chat-set", "split": "train"})
    with pytest.raises(DataError) as info:
        validate(spec)
    msg = info.value.message
    assert msg.startswith("data.hf=org/some-chat-set: cannot load it from the Hugging Face Hub")
    assert "save_to_disk" in msg and "data.path" in msg


# ----------------------------------------------------------------------------- bad inputs: one line, exit 2


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("rows, fmt, expected", [
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}], "auto",
     "instance 0: key 'conversations[1].from': unknown role 'bot'; use one of human, user, gpt"),
    ([SHAREGPT_ROWS[1], {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]}], "auto",
     "instance 1: key 'conversations[1].value': empty turn"),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Again"},
                         {"from": "gpt", "value": "Hello"}]}], "auto",
     "instance 0: key 'conversations[1].from': 'human' follows 'human'; ShareGPT turns alternate human -> gpt"),
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}], "auto",
     "instance 0: key 'messages[1].content': empty content"),
    ([{"instruction": "Do it", "output": 3}], "alpaca", "instance 0: key 'output': expected a string, got number"),
], ids=["unknown-role", "empty-turn", "not-alternating", "openai-empty-turn", "alpaca-field-type"])
def test_bad_rows_name_file_row_and_field(tmp_path, cli, rows, fmt, expected):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out.json"
    line = one_line_error(cli("data", "convert", str(path), "--format", fmt, "--out", str(out)))
    assert line.startswith(f"error: {path}:") and expected in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == [path]  # nothing written, no partial file


def test_a_role_tag_can_be_mapped(tmp_path, cli):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                 {"from": "bot", "value": "Hello"}]}])
    ok = cli("data", "validate", str(path), "--roles", "bot=assistant")
    assert ok.returncode == 0 and "type: conversation\ninstances: 1" in ok.stdout, ok.stderr


def test_missing_mapped_column_lists_the_columns_there(tmp_path, cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"q": ["a"], "good": ["b"], "bad": ["c"]}), path)
    line = one_line_error(cli("data", "validate", str(path), "--columns", "prompt=question,chosen=good,rejected=bad"))
    assert line == (f"error: {path}: data.columns maps 'prompt' to column 'question', which is not there; "
                    "its columns: q, good, bad")


def test_referenced_image_that_is_absent(tmp_path, cli):
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "img" / "a.png")  # a real image (a PNG signature alone is refused)
    path = write_jsonl(tmp_path / "d.jsonl", [{"image": "img/a.png", "input": "What is it?", "output": "A cat."},
                                              {"image": "img/b.png", "input": "What is it?", "output": "A dog."}])
    line = one_line_error(cli("data", "validate", str(path), "--type", "image_text"))
    assert line.startswith(f"error: {path}:2: instance 1: key 'image': file \"img/b.png\" not found")


def test_convert_never_overwrites_and_declared_conflicts_are_named(tmp_path, cli):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    out = tmp_path / "out.json"
    out.write_text("keep me")
    line = one_line_error(cli("data", "convert", str(path), "--out", str(out)))
    assert "already exists" in line and out.read_text() == "keep me"
    line = one_line_error(cli("data", "validate", str(path), "--type", "text_only"))
    assert "alpaca rows map onto conversation or text2text, not 'text_only'" in line
    line = one_line_error(cli("data", "validate", str(path), "--format", "tsv"))
    assert "--format tsv: unknown" in line


def test_a_datasetdict_directory_names_its_splits(tmp_path, cli):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(str(tmp_path / "dd"))
    line = one_line_error(cli("data", "validate", str(tmp_path / "dd")))
    assert "a DatasetDict saved with save_to_disk (splits: train, test); point at one split" in line
    ok = cli("data", "validate", str(tmp_path / "dd" / "train"))
    assert ok.returncode == 0 and "type: text_only\ninstances: 1" in ok.stdout


# ----------------------------------------------------------------------------- Ray Data and training


def test_stats_and_ray_data_rows_equal_the_lmflow_json(ray_session, tmp_path, tiny_llama):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmflow_ray.data.reader import read_dataset
    from lmflow_ray.data.stats import token_length_stats

    instances = _sft_instances(24)
    lmflow = tmp_path / "d.json"
    lmflow.write_text(json.dumps({"type": "conversation", "instances": instances}))
    share = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([_as_sharegpt(i) for i in instances]), share, row_group_size=5)
    a = read_dataset(lmflow)[0].take_all()
    b = read_dataset(share)[0].take_all()
    assert a == b and len(a) == 24
    assert token_length_stats(share, str(tiny_llama)) == token_length_stats(lmflow, str(tiny_llama))


def _sft_instances(n: int) -> list[dict]:
    words = ["the cat sees the red ball", "a dog runs", "my sister finds the old clock on the hill"]
    return [{"system": SYSTEM, "messages": [{"role": "user", "content": f"question {i}?"},
                                            {"role": "assistant", "content": " ".join([words[i % 3]] * (1 + i % 4))}]}
            for i in range(n)]


def _as_sharegpt(inst: dict) -> dict:
    tags = {"user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": "system", "value": inst["system"]}]
            + [{"from": tags[m["role"]], "value": m["content"]} for m in inst["messages"]]}

"""Dataset validation: every class of user mistake is one clear DataError naming its place.

Each error test writes a small broken dataset and checks that the message names the file
and, where it applies, the line:column or the instance index and key. The CLI tests check
the contract users see (exit status 2, `error:` lines, no traceback). The fuzz tests feed
random and mutated instances and raw bytes: `validate` may only return a summary or raise
DataError; anything else is a bug that would reach users as a traceback.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmflow_ray.data.formats import TYPES, normalize
from lmflow_ray.data.reader import _blocks
from lmflow_ray.data.source import MAX_REPORTED, DataError, iter_instances, validate

CONV = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
# One valid instance per type; test_valid_instance_of_every_type fails if a type is added without one.
VALID = {
    "text_only": {"text": "Some text."},
    "text2text": {"input": "2+2=", "output": "4"},
    "conversation": CONV,
    "paired_conversation": {"chosen": CONV, "rejected": {"messages": [CONV["messages"][0],
                                                                      {"role": "assistant", "content": "No."}]}},
    "paired_text_to_text": {"prompt": "Say hi", "chosen": "Hi", "rejected": "Go away", "margin": 1.5},
    "text_to_scored_textlist": {"input": "Say hi", "output": [{"text": "Hi", "score": 1}, {"text": "No", "score": -0.5}]},
    "image_text": {"image": "img/cat.png", "messages": CONV["messages"]},
    "multiple_choice": {"input": "Question: 2 + 2?\nAnswer:", "choices": ["4", "5"], "answer": 0},
}


def with_image(path: Path) -> Path:
    """VALID's image_text instance names img/cat.png beside its file: validation checks it is there."""
    (path.parent / "img").mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(path.parent / "img" / "cat.png")  # a real image: its header is read
    return path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return with_image(path)


def write_jsonl(path: Path, instances: list) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in instances))
    return with_image(path)


def dataset(tmp_path: Path, dtype: str, instances: list, name: str = "data.json") -> Path:
    return write_json(tmp_path / name, {"type": dtype, "instances": instances})


def error_of(path: Path, dtype: str | None = None) -> DataError:
    with pytest.raises(DataError) as info:
        validate(path, dtype)
    return info.value


# ----------------------------------------------------------------------------- file-level errors


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"type": "text_only", "instances": [\n {"text": "a"},\n {"text": "b",}\n]}')
    # Line 3 is ` {"text": "b",}`; the stray `}` after the comma is column 15.
    assert error_of(path).message.startswith(f"{path}:3:15: invalid JSON")


def test_truncated_json_says_file_ends_early(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('{"type": "text_only", "instances": [{"text": "a"}')
    msg = error_of(path).message
    assert msg.startswith(str(path)) and "ends early" in msg


def test_missing_type(tmp_path):
    path = write_json(tmp_path / "d.json", {"instances": [{"text": "a"}]})
    msg = error_of(path).message
    assert msg.startswith(f"{path}: missing top-level key 'type'") and "text_only" in msg


def test_unknown_type(tmp_path):
    msg = error_of(dataset(tmp_path, "chat", [{"text": "a"}])).message
    assert msg.startswith(f"{tmp_path / 'data.json'}: unknown type 'chat'") and "conversation" in msg


def test_configured_type_disagrees_with_file(tmp_path):
    path = dataset(tmp_path, "text_only", [{"text": "a"}])
    assert "declares type 'text_only' but the config says 'text2text'" in error_of(path, "text2text").message


def test_mixed_types_in_directory(tmp_path):
    dataset(tmp_path, "text_only", [{"text": "a"}], "a.json")
    dataset(tmp_path, "text2text", [{"input": "a", "output": "b"}], "b.json")
    msg = error_of(tmp_path).message
    assert "mixed types" in msg and "a.json=text_only" in msg and "b.json=text2text" in msg


def test_missing_instances(tmp_path):
    path = write_json(tmp_path / "d.json", {"type": "text_only"})
    assert error_of(path).message == (
        f"{path}: missing key 'instances'; a dataset file is {{\"type\": ..., \"instances\": [...]}}")


def test_empty_instances(tmp_path):
    path = dataset(tmp_path, "text_only", [])
    assert error_of(path).message == f"{path}: 'instances' is empty; add at least one instance"


@pytest.mark.parametrize("value", [{"text": "a"}, {"item": {"text": "a"}}, "text", 3])
def test_instances_not_an_array(tmp_path, value):
    # {"item": ...} once slipped through: ijson's "instances.item" prefix matches an object key too.
    path = write_json(tmp_path / "d.json", {"type": "text_only", "instances": value})
    assert error_of(path).message.startswith(f"{path}: 'instances' must be an array")


def test_top_level_not_an_object(tmp_path):
    path = write_json(tmp_path / "d.json", "a string")
    assert error_of(path).message.startswith(f"{path}: top level must be an object")


def test_top_level_array_is_read_as_rows(tmp_path):
    # Alpaca and ShareGPT releases are JSON arrays of rows; LMFlow-shaped rows get their type from their fields.
    path = write_json(tmp_path / "d.json", [{"text": "a"}, {"text": "b"}])
    summary = validate(path)
    assert (summary.type, summary.instances) == ("text_only", 2)


def test_non_utf8_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'{"type": "text_only", "instances": [\n{"text": "caf\xe9"}]}')
    msg = error_of(path).message
    assert msg.startswith(f"{path}: not valid UTF-8 at line 2, column 14") and "re-encode" in msg


def test_non_utf8_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert error_of(path, "text_only").message.startswith(f"{path}:2:14: not valid UTF-8")


def test_jsonl_type_from_fields_or_named_when_unclear(tmp_path):
    assert validate(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])).type == "text_only"
    path = write_jsonl(tmp_path / "e.jsonl", [{"question": "a", "answer": "b"}])
    msg = error_of(path).message
    assert msg.startswith(f"{path}: cannot tell the dataset type from the fields (answer, question)") and "--type" in msg


def test_jsonl_bad_line_names_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    # The cut-off line 2 is 12 characters long: the missing `}` is column 13 (not column 1).
    assert error_of(path, "text_only").message.startswith(f"{path}:2:13: invalid JSON")


def test_jsonl_deeply_nested_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n' + "[" * 100_000 + "\n")
    assert error_of(path, "text_only").message == f"{path}:2: JSON nested too deeply; flatten this instance"


def test_jsonl_lone_surrogate_escape(tmp_path):
    # Python's json keeps "\ud800" as an unencodable surrogate that Arrow would choke on later.
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "bad \\ud800"}\n')
    assert error_of(path, "text_only").message.startswith(f"{path}:2: lone UTF-16 surrogate")


def test_empty_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    assert error_of(path, "text_only").message == f"{path}: no instances; add at least one line"


def test_dataset_path_missing(tmp_path):
    msg = error_of(tmp_path / "nope.json").message
    assert msg.startswith(f"dataset not found: {tmp_path / 'nope.json'}")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text\na\n")
    assert error_of(path).message.startswith(f"{path}: unsupported file type '.csv'")


def test_directory_without_dataset_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert "holds no dataset files (.json, .jsonl, .parquet, .arrow)" in error_of(tmp_path).message


# ----------------------------------------------------------------------------- instance-level errors


@pytest.mark.parametrize(
    ("dtype", "instance", "expected"),
    [
        ("text2text", {"input": "a"}, "key 'output': missing"),
        ("text_only", {"text": 3}, "key 'text': expected a string, got number"),
        ("paired_text_to_text", {"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"},
         "key 'margin': expected a number, got string"),
        ("text_to_scored_textlist", {"input": "a", "output": [{"text": "b", "score": "high"}]},
         "key 'output[0].score': expected a number, got string"),
        ("conversation", {"messages": [{"role": "assistant", "content": "Hi"}]},
         "key 'messages[0].role': 'assistant' out of order, expected user (conversations start with a user turn)"),
        ("conversation", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
         "key 'messages[1].role': 'user' out of order, expected assistant"),
        ("conversation", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
         "key 'messages[1].content': empty content"),
        ("conversation", {"messages": [{"role": "robot", "content": "beep"}]},
         "key 'messages[0].role': unknown role 'robot'; use one of user, assistant, tool"),
        ("conversation", {"msgs": []}, "key 'messages': missing"),
        ("conversation", {"messages": "Hi"}, "key 'messages': expected an array, got string"),
        ("paired_conversation", {"chosen": CONV, "rejected": {"messages": []}},
         "key 'rejected.messages': empty"),
        ("image_text", {"image": "", "input": "a", "output": "b"}, "key 'image': expected a file path"),
        ("text_only", ["not", "an", "object"], "expected an object, got array"),
        ("multiple_choice", {"input": "Q", "choices": ["a", "b"]},
         "key 'answer': missing (the correct choice: its text or its 0-based index)"),
        ("multiple_choice", {"input": "Q", "choices": ["a", "b"], "answer": "c"},
         "key 'answer': \"c\" is not one of the 2 choices (give a choice's text or an index 0-1)"),
        ("multiple_choice", {"input": "Q", "choices": ["a", "b"], "answer": 2}, "key 'answer': 2 is not one of the 2"),
        ("multiple_choice", {"input": "Q", "choices": [], "answer": 0},
         "key 'choices': expected at least 2 non-empty strings, got []"),
    ],
    ids=["missing-key", "wrong-type", "margin-type", "score-type", "starts-with-assistant", "roles-out-of-order",
         "empty-content", "unknown-role", "messages-missing", "messages-not-array", "paired-empty", "image-empty",
         "instance-not-object", "mc-no-answer", "mc-answer-not-a-choice", "mc-index-out-of-range", "mc-empty-choices"],
)
def test_instance_problem_names_file_index_and_key(tmp_path, dtype, instance, expected):
    # The bad instance is the second one, so the index in the message is checked to be 1, not 0.
    path = dataset(tmp_path, dtype, [VALID[dtype], instance])
    assert error_of(path).message.startswith(f"{path}: instance 1: {expected}")


def test_jsonl_instance_problem_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"txt": "b"}\n')
    # Blank lines are skipped: line 3 holds instance 1.
    assert error_of(path, "text_only").message == f"{path}:3: instance 1: key 'text': missing (a string is required)"


def test_problems_capped_at_twenty_with_count_of_the_rest(tmp_path):
    path = dataset(tmp_path, "text_only", [{"txt": str(i)} for i in range(50)])
    err = error_of(path)
    lines = [err.message, *err.details]
    assert len(lines) == MAX_REPORTED + 1
    assert lines[0] == f"{path}: instance 0: key 'text': missing (a string is required)"
    assert lines[MAX_REPORTED - 1].startswith(f"{path}: instance 19:")
    assert lines[-1] == "... and 30 more problems"


def test_problems_across_files_of_a_directory(tmp_path):
    dataset(tmp_path, "text_only", [{"text": "ok"}, {"text": None}], "a.json")
    dataset(tmp_path, "text_only", [{"text": 1}], "b.json")
    err = error_of(tmp_path)
    assert err.message.startswith(f"{tmp_path / 'a.json'}: instance 1:")
    assert err.details == [f"{tmp_path / 'b.json'}: instance 0: key 'text': expected a string, got number"]


# ----------------------------------------------------------------------------- valid datasets


def test_valid_instance_of_every_type():
    assert set(VALID) == set(TYPES)


@pytest.mark.parametrize("dtype", TYPES)
def test_valid_dataset_of_every_type(tmp_path, dtype):
    summary = validate(dataset(tmp_path, dtype, [VALID[dtype]] * 3))
    assert (summary.type, summary.instances, summary.trimmed) == (dtype, 3, 0)
    assert summary.files[0].path == str(tmp_path / "data.json")


@pytest.mark.parametrize("dtype", TYPES)
def test_valid_jsonl_with_configured_type(tmp_path, dtype):
    summary = validate(write_jsonl(tmp_path / "d.jsonl", [VALID[dtype]] * 2), dtype)
    assert (summary.type, summary.instances) == (dtype, 2)


def test_directory_of_files_counts_each(tmp_path):
    dataset(tmp_path, "text2text", [VALID["text2text"]] * 2, "a.json")
    dataset(tmp_path, "text2text", [VALID["text2text"]] * 5, "b.json")
    (tmp_path / "README.md").write_text("ignored")
    summary = validate(tmp_path)
    assert summary.instances == 7 and [f.instances for f in summary.files] == [2, 5]


def test_leading_system_message_moves_to_system(tmp_path):
    inst = {"messages": [{"role": "system", "content": "Be brief."}, *CONV["messages"]]}
    path = dataset(tmp_path, "conversation", [inst])
    assert validate(path).instances == 1
    (_, _, read), = iter_instances(path)
    row = normalize("conversation", read)
    assert row["system"] == "Be brief." and [m["role"] for m in row["messages"]] == ["user", "assistant"]


def test_system_given_twice_is_an_error(tmp_path):
    inst = {"system": "A", "messages": [{"role": "system", "content": "B"}, *CONV["messages"]]}
    assert "system prompt given twice" in error_of(dataset(tmp_path, "conversation", [inst])).message


def test_trailing_user_turn_is_trimmed_and_counted(tmp_path):
    inst = {"messages": [*CONV["messages"], {"role": "user", "content": "And?"}]}
    summary = validate(dataset(tmp_path, "conversation", [inst, CONV, inst]))
    assert (summary.instances, summary.trimmed) == (3, 2)
    assert [m["role"] for m in normalize("conversation", inst)["messages"]] == ["user", "assistant"]


def test_tool_turns_between_assistant_turns_are_valid(tmp_path):
    inst = {"tools": [{"name": "calc"}], "messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "calc(2+2)"},
        {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4."}]}
    assert validate(dataset(tmp_path, "conversation", [inst])).instances == 1


# ----------------------------------------------------------------------------- CLI


def assert_clean_user_error(proc) -> list[str]:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), proc.stderr
    return lines


def test_cli_validate_bad_json_exits_2(tmp_path, cli):
    path = tmp_path / "bad.json"
    path.write_text('{"type": "text_only", "instances": [\n{"text": "a"]}')
    lines = assert_clean_user_error(cli("data", "validate", str(path)))
    assert lines[0].startswith(f"error: {path}:2:")


def test_cli_validate_many_problems_exits_2_one_line_each(tmp_path, cli):
    path = dataset(tmp_path, "text_only", [{"txt": "a"}] * 25)
    lines = assert_clean_user_error(cli("data", "validate", str(path)))
    assert len(lines) == MAX_REPORTED + 1 and lines[-1] == "error: ... and 5 more problems"


@pytest.mark.parametrize("args", [["nope.json"], ["examples/data/sft_tiny.json", "--type", "text_only"],
                                  ["examples/data/sft_tiny.json", "--type", "chat"]],
                         ids=["missing-path", "type-mismatch", "unknown-type"])
def test_cli_validate_user_mistakes_exit_2(args, cli):
    assert_clean_user_error(cli("data", "validate", *args))


def test_cli_validate_jsonl_needs_type_when_fields_are_unclear(tmp_path, cli):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "a"}])
    assert "--type" in assert_clean_user_error(cli("data", "validate", str(path)))[0]
    ok = cli("data", "validate", str(path), "--type", "text_only", "--columns", "text=body")
    assert ok.returncode == 0 and "instances: 1" in ok.stdout


def test_cli_validate_good_dataset(tmp_path):
    proc = run_cli("data", "validate", "examples/data/sft_tiny.json")
    assert proc.returncode == 0, proc.stderr
    n = len(json.loads((REPO / "examples/data/sft_tiny.json").read_text())["instances"])
    assert f"type: conversation\ninstances: {n}\nfiles: 1\n" in proc.stdout
    assert f"sft_tiny.json: {n} instances" in proc.stdout


def test_cli_validate_directory_reports_trimmed(tmp_path, cli):
    dataset(tmp_path, "conversation", [CONV], "a.json")
    dataset(tmp_path, "conversation", [{"messages": [*CONV["messages"], {"role": "user", "content": "?"}]}], "b.json")
    proc = cli("data", "validate", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "instances: 2\nfiles: 2\n" in proc.stdout and "note: 1 conversations end with a user/tool turn" in proc.stdout


def test_cli_stats_rejects_untokenizable_type(tmp_path, cli):
    path = dataset(tmp_path, "paired_conversation", [VALID["paired_conversation"]])
    lines = assert_clean_user_error(cli("data", "stats", str(path), "--model", "tiny-llama"))
    assert "'paired_conversation'" in lines[0] and "text_only, text2text, conversation" in lines[0]


# ----------------------------------------------------------------------------- fuzzing

KEYS = ["type", "instances", "text", "input", "output", "messages", "role", "content", "system", "tools",
        "chosen", "rejected", "prompt", "margin", "score", "image"]
# Any character, lone surrogates (category Cs, which json.dumps escapes as \udXXX) included.
# Random code points seldom hit the awkward ones, so half the strings are made of those.
AWKWARD = "\ud800\udbff\udc00\udfff\x00\n\u2028\\\" ab"
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | st.text(st.sampled_from(AWKWARD), max_size=6)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT | st.sampled_from(["user", "assistant", "tool"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), children, max_size=5),
    max_leaves=20,
)


@st.composite
def mutated_conversation(draw) -> dict:
    """A valid conversation, then a few random mutations of the kinds users make."""
    turns = draw(st.integers(1, 3))
    msgs = [{"role": r, "content": draw(ANY_TEXT) or "x"} for _ in range(turns) for r in ("user", "assistant")]
    inst = {"messages": msgs, "system": draw(st.none() | ANY_TEXT)}
    for _ in range(draw(st.integers(0, 4))):
        target = inst if not msgs or draw(st.booleans()) else draw(st.sampled_from(msgs))
        kind = draw(st.sampled_from(["drop", "swap", "wrong-type", "empty", "unicode"]))
        key = draw(st.sampled_from(sorted(target))) if target else None
        if key is None:
            continue
        if kind == "drop":
            del target[key]
        elif kind == "swap" and len(msgs) > 1:
            i, j = draw(st.integers(0, len(msgs) - 1)), draw(st.integers(0, len(msgs) - 1))
            msgs[i]["role"], msgs[j]["role"] = msgs[j].get("role"), msgs[i].get("role")
        elif kind == "wrong-type":
            target[key] = draw(JSON_VALUES)
        elif kind == "empty":
            target[key] = draw(st.sampled_from(["", " ", [], {}]))
        else:
            target[key] = draw(ANY_TEXT)
    return inst


def random_texts(dtype: str):
    """Instances of the right shape for `dtype` whose strings are random unicode."""
    def fill(value, key=None):
        if isinstance(value, str) and key != "role":
            return ANY_TEXT.map(lambda t: t + "x")  # non-blank, as conversation turns must be
        if isinstance(value, dict):
            return st.fixed_dictionaries({k: fill(v, k) for k, v in value.items()})
        if isinstance(value, list):
            return st.tuples(*(fill(v) for v in value)).map(list)
        return st.just(value)

    return fill(VALID[dtype])


def instance_for(dtype: str):
    conv = mutated_conversation()
    paired = st.fixed_dictionaries({"chosen": conv, "rejected": conv})
    return st.one_of(JSON_VALUES, conv, paired, st.just(VALID[dtype]), random_texts(dtype))


def check_validate_outcome(path: Path, dtype: str | None, written: int | None) -> None:
    """validate returns a summary or raises DataError, nothing else; what it accepts, the
    reader's block builder (run here without Ray) turns into exactly that many Arrow rows."""
    try:
        summary = validate(path, dtype)
    except DataError as e:
        assert e.message and "\n" not in e.message
        return
    if written is not None:
        assert summary.instances == written
    blocks = _blocks(iter_instances(path), summary.type, str(path), rows_per_block=2)
    assert sum(block.num_rows for block in blocks) == summary.instances


def write_any(folder: Path, dtype: str, instances: list, as_jsonl: bool, ascii_only: bool,
              declared: str | None) -> tuple[Path, str | None]:
    """Write instances as .jsonl (type configured) or .json (type `declared`, None = no key)."""
    if as_jsonl:
        text = "".join(json.dumps(i, ensure_ascii=ascii_only) + "\n" for i in instances)
        path, configured = folder / "d.jsonl", dtype
    else:
        top = {"instances": instances} if declared is None else {"type": declared, "instances": instances}
        text, path, configured = json.dumps(top, ensure_ascii=ascii_only), folder / "d.json", None
    # Unpaired surrogates can only be written with surrogatepass, which makes invalid UTF-8.
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return path, configured


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from(TYPES), as_jsonl=st.booleans(), ascii_only=st.booleans())
def test_fuzz_instances_only_data_error(tmp_path_factory, data, dtype, as_jsonl, ascii_only):
    instances = data.draw(st.lists(instance_for(dtype), max_size=5))
    declared = data.draw(st.sampled_from([dtype, dtype, "chat", None]))
    path, configured = write_any(tmp_path_factory.mktemp("fuzz"), dtype, instances, as_jsonl, ascii_only, declared)
    check_validate_outcome(path, configured, len(instances))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from(TYPES), as_jsonl=st.booleans(), ascii_only=st.booleans())
def test_fuzz_random_unicode_in_valid_shapes(tmp_path_factory, data, dtype, as_jsonl, ascii_only):
    # Right shapes, random strings: what validate accepts must also become Arrow rows (a lone
    # surrogate escape in .jsonl once passed validation and then broke the reader).
    instances = data.draw(st.lists(random_texts(dtype), min_size=1, max_size=4))
    path, configured = write_any(tmp_path_factory.mktemp("uni"), dtype, instances, as_jsonl, ascii_only, dtype)
    check_validate_outcome(path, configured, len(instances))


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=400), suffix=st.sampled_from([".json", ".jsonl"]))
def test_fuzz_random_bytes_only_data_error(tmp_path_factory, blob, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"d{suffix}"
    path.write_bytes(blob)
    check_validate_outcome(path, "text_only" if suffix == ".jsonl" else None, None)


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(TYPES), suffix=st.sampled_from([".json", ".jsonl"]), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3))
def test_fuzz_truncated_and_corrupted_files_only_data_error(tmp_path_factory, dtype, suffix, cut, flips):
    folder = tmp_path_factory.mktemp("cut")
    if suffix == ".json":
        good = dataset(folder, dtype, [VALID[dtype]] * 3)
    else:
        good = write_jsonl(folder / "d.jsonl", [VALID[dtype]] * 3)
    raw = bytearray(good.read_bytes()[: int(len(good.read_bytes()) * cut)])
    for where, byte in flips:
        if raw:
            raw[int(where * (len(raw) - 1))] = byte
    good.write_bytes(bytes(raw))
    check_validate_outcome(good, dtype if suffix == ".jsonl" else None, None)


def test_fuzz_line_damage_of_real_example(tmp_path):
    """Line-level damage to a real example file: deleting or duplicating lines never crashes."""
    lines = (REPO / "examples/data/sft_tiny.json").read_text().splitlines()[:200]
    rng = random.Random(0)
    for trial in range(30):
        damaged = [line for line in lines if rng.random() > 0.05]
        path = tmp_path / f"t{trial}.json"
        path.write_text("\n".join(damaged))
        check_validate_outcome(path, None, None)

"""Conversation templates and tokenization: exactly the assistant turns (and their end token) are learned."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from lmflow_ray.data.templates import TEMPLATES, render_prompt, render_segments
from lmflow_ray.data.tokenize import (
    IGNORE_INDEX,
    learned_token_count,
    tokenize_batch,
    tokenize_conversation,
    tokenize_text,
    tokenize_text2text,
)
from lmflow_ray.errors import UserError
from lmflow_ray.models.zoo import fetch_model

SYSTEM = "You answer in one short sentence."
USER_TEXTS = ["What is the capital of France?", "And its population?"]
TOOL_TEXT = '{"population": 2102650}'
ASSISTANT_TEXTS = ["Paris is the capital.", "lookup(city='Paris')", "About 2.1 million people live there."]
CONV = {
    "system": SYSTEM,
    "messages": [
        {"role": "user", "content": USER_TEXTS[0]},
        {"role": "assistant", "content": ASSISTANT_TEXTS[0]},
        {"role": "user", "content": USER_TEXTS[1]},
        {"role": "assistant", "content": ASSISTANT_TEXTS[1]},
        {"role": "tool", "content": TOOL_TEXT},
        {"role": "assistant", "content": ASSISTANT_TEXTS[2]},
    ],
    "tools": "",
}

# Written out independently of templates.py: the end-of-turn text each family learns.
END_OF_TURN = {
    "chatml": "<|im_end|>", "qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "llama2": "{eos}",
    "zephyr": "</s>", "phi3": "<|end|>", "gemma": "<end_of_turn>", "deepseek": "{eos}",
    "empty": "{eos}", "empty_no_special_tokens": "",
}


@pytest.fixture(scope="module")
def tiny():
    return AutoTokenizer.from_pretrained(str(fetch_model("tiny-llama")))


@pytest.fixture(scope="module")
def smol():
    return AutoTokenizer.from_pretrained(str(fetch_model("smollm2-135m-instruct")))


def learned_spans(example: dict, tokenizer) -> list[str]:
    """Decoded text of each contiguous run of learned tokens."""
    spans, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    return [tokenizer.decode(r) for r in spans + ([run] if run else [])]


def check_learned(example: dict, tokenizer, end: str) -> None:
    spans = learned_spans(example, tokenizer)
    assert spans == [a + end for a in ASSISTANT_TEXTS]
    learned = "".join(spans)
    for context in [SYSTEM, TOOL_TEXT, *USER_TEXTS]:
        assert context not in learned
    assert learned_token_count(example["labels"]) == sum(len(tokenizer(s, add_special_tokens=False)["input_ids"])
                                                         for s in spans)


def test_every_name_is_a_template():
    assert set(TEMPLATES) == set(END_OF_TURN)


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_named_template_learns_assistant_turns_only(tiny, name):
    example = tokenize_conversation(CONV, tiny, name, max_length=None)
    end = END_OF_TURN[name].replace("{eos}", tiny.eos_token)
    check_learned(example, tiny, end)
    full = tiny.decode(example["input_ids"])
    assert full == "".join(text for text, _ in render_segments(CONV, name, tiny))
    for context in [SYSTEM, TOOL_TEXT, *USER_TEXTS]:
        assert context in full


GOLDEN = {  # one user/assistant exchange with the system prompt; tiny-llama: bos <s>, eos <|im_end|>
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n",
    "qwen2": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>",
    "llama2": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A<|im_end|>",
    "zephyr": "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\nA</s>\n",
    "phi3": "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n",
    "gemma": "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n",
    "deepseek": "<s>S\n\nUser: U\n\nAssistant: A<|im_end|>",
    "empty": "<s>SUA<|im_end|>",
    "empty_no_special_tokens": "SUA",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_named_template_renders_family_format(tiny, name):
    conv = {"system": "S", "messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}
    assert "".join(text for text, _ in render_segments(conv, name, tiny)) == GOLDEN[name]


def test_qwen2_default_system_and_gemma_without_system(tiny):
    conv = {"system": "", "messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}
    qwen = "".join(t for t, _ in render_segments(conv, "qwen2", tiny))
    assert qwen.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nU")
    gemma = "".join(t for t, _ in render_segments(conv, "gemma", tiny))
    assert gemma.startswith("<bos><start_of_turn>user\nU<end_of_turn>")


def test_tokenizer_template_tiny(tiny):
    example = tokenize_conversation(CONV, tiny, None, max_length=None)
    check_learned(example, tiny, "<|im_end|>")


def with_system(conv: dict) -> list[dict]:
    return [{"role": "system", "content": conv["system"]}, *conv["messages"]]


@pytest.mark.e2e
@pytest.mark.parametrize("template", [None, "chatml"])
def test_smollm2_learned_spans(smol, template):
    check_learned(tokenize_conversation(CONV, smol, template, max_length=None), smol, "<|im_end|>")


@pytest.mark.e2e
def test_smollm2_own_template_reproduces_apply_chat_template(smol):
    # No trailing-newline caveat: the "\n" after the last <|im_end|> is kept as an unlearned segment.
    example = tokenize_conversation(CONV, smol, None, max_length=None)
    assert smol.decode(example["input_ids"]) == smol.apply_chat_template(with_system(CONV), tokenize=False)
    # SmolLM2's own default system prompt appears when the row has none.
    bare = tokenize_conversation({**CONV, "system": ""}, smol, None, max_length=None)
    assert smol.decode(bare["input_ids"]) == smol.apply_chat_template(CONV["messages"], tokenize=False)


@pytest.mark.e2e
def test_smollm2_render_prompt(smol):
    msgs = CONV["messages"][:3]
    expected = smol.apply_chat_template(with_system({"system": SYSTEM, "messages": msgs}), tokenize=False,
                                        add_generation_prompt=True)
    assert render_prompt(msgs, SYSTEM, None, smol) == expected
    assert render_prompt(msgs, SYSTEM, "chatml", smol) == expected


def test_render_prompt_named(tiny):
    prompt = render_prompt(CONV["messages"][:1], "", "llama3", tiny)
    assert prompt == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + USER_TEXTS[0]
                      + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_tools_reach_the_system_prompt(tiny):
    text = "".join(t for t, _ in render_segments({**CONV, "tools": '[{"name": "lookup"}]'}, "chatml", tiny))
    assert text.startswith(f'<|im_start|>system\n{SYSTEM}\n\n[{{"name": "lookup"}}]<|im_end|>')


def test_unknown_template_and_missing_chat_template(tiny):
    with pytest.raises(UserError, match="unknown conversation template"):
        render_segments(CONV, "vicuna", tiny)
    bare = AutoTokenizer.from_pretrained(str(fetch_model("tiny-llama")))
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat_template"):
        render_segments(CONV, None, bare)


def test_prefix_inconsistent_chat_template_is_refused():
    tok = AutoTokenizer.from_pretrained(str(fetch_model("tiny-llama")))
    # Earlier assistant turns are dropped from the history, as reasoning templates do.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(UserError, match="not prefix-consistent"):
        render_segments(CONV, None, tok)


def test_text2text_labels(tiny):
    example = tokenize_text2text({"input": "Translate: chat", "output": "cat"}, tiny, max_length=None)
    assert example["input_ids"][0] == tiny.bos_token_id and example["labels"][0] == IGNORE_INDEX
    assert example["input_ids"][-1] == tiny.eos_token_id
    assert learned_spans(example, tiny) == ["cat" + tiny.eos_token]
    unlearned = [t for t, lab in zip(example["input_ids"], example["labels"]) if lab == IGNORE_INDEX]
    assert tiny.decode(unlearned) == tiny.bos_token + "Translate: chat"


def test_multiple_choice_trains_on_the_right_choice(tiny):
    """A multiple_choice row (as Ray Data hands it: numpy arrays) learns " " + its right choice, nothing else."""
    import numpy as np

    from lmflow_ray.data.tokenize import tokenize_batch

    batch = {"input": np.array(["Question: 2 + 2?\nAnswer:"], dtype=object),
             "choices": np.array([np.array(["three", "four"], dtype=object)], dtype=object), "answer": np.array([1])}
    out = tokenize_batch(batch, "multiple_choice", tiny, None, 64)
    example = {"input_ids": out["input_ids"][0], "labels": out["labels"][0]}
    assert learned_spans(example, tiny) == [" four" + tiny.eos_token]


def test_text_labels_and_no_cut_by_default(tiny):
    text = "the quick brown fox " * 40
    example = tokenize_text({"text": text}, tiny)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][0] == tiny.bos_token_id and example["input_ids"][-1] == tiny.eos_token_id
    assert tiny.decode(example["input_ids"][1:-1]) == text


def test_truncation_keeps_the_left(tiny):
    full = tokenize_conversation(CONV, tiny, "chatml", max_length=None)
    cut = tokenize_conversation(CONV, tiny, "chatml", max_length=20)
    assert len(cut["input_ids"]) == 20
    assert cut == {k: v[:20] for k, v in full.items()}
    text = tokenize_text({"text": "a b c d e f g h"}, tiny, max_length=4)
    assert len(text["input_ids"]) == 4 and text["input_ids"][0] == tiny.bos_token_id
    t2t = tokenize_text2text({"input": "x " * 50, "output": "y"}, tiny, max_length=8)
    assert len(t2t["input_ids"]) == 8 and learned_token_count(t2t["labels"]) == 0


def test_tokenize_batch_numpy_like_ray(tiny):
    # Ray's numpy batches hold list<struct> columns as object arrays of arrays of dicts.
    messages = np.empty(2, dtype=object)
    messages[0] = np.array(CONV["messages"], dtype=object)
    messages[1] = np.array(CONV["messages"][:2], dtype=object)
    batch = {"system": np.array([SYSTEM, None], dtype=object), "messages": messages,
             "tools": np.array(["", ""], dtype=object)}
    out = tokenize_batch(batch, "conversation", tiny, "chatml", max_length=None)
    assert out["input_ids"][0] == tokenize_conversation(CONV, tiny, "chatml", None)["input_ids"]
    second = {"system": "", "messages": CONV["messages"][:2], "tools": ""}
    assert out["labels"][1] == tokenize_conversation(second, tiny, "chatml", None)["labels"]

    t2t = tokenize_batch({"input": np.array(["a", "b"]), "output": np.array(["c", "d"])}, "text2text", tiny,
                         None, 16)
    assert learned_spans({"input_ids": t2t["input_ids"][1], "labels": t2t["labels"][1]}, tiny) == \
        ["d" + tiny.eos_token]
    text = tokenize_batch({"text": np.array(["word " * 30])}, "text_only", tiny, None, max_length=5)
    assert len(text["input_ids"][0]) > 5  # text_only is packed later, never cut here
    with pytest.raises(UserError, match="cannot be tokenized"):
        tokenize_batch({"prompt": np.array(["p"])}, "paired_text_to_text", tiny, None, 16)

"""Generation with plain transformers `generate` (the engine that needs nothing but torch)."""

from __future__ import annotations


def chat_generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                  temperature: float = 0.0, system: str | None = None) -> list[str]:
    """Answer each conversation (a list of {role, content}); greedy when temperature == 0."""
    import torch

    prompts = []
    for msgs in conversations:
        full = ([{"role": "system", "content": system}] if system else []) + list(msgs)
        prompts.append(tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True))
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

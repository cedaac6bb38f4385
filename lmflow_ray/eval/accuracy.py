"""Task accuracy of greedy answers: exact match against the reference assistant turn.

Used to show that finetuning helped (tests/test_lora_smollm2.py, the demo): for each
held-out conversation, the model answers the prompt turns greedily and the answer counts
when it equals the dataset's final assistant content (whitespace-trimmed).
"""

from __future__ import annotations

import json
from pathlib import Path


def exact_match(model: str | Path, data: str | Path, max_new_tokens: int = 48, batch_size: int = 8,
                limit: int | None = None) -> dict:
    from lmflow_ray.data.formats import normalize, prompt_messages
    from lmflow_ray.inference.hf import chat_generate
    from lmflow_ray.models.loading import load_for_generation

    insts = json.loads(Path(data).read_text())["instances"][:limit]
    convs = [normalize("conversation", i) for i in insts]
    prompts = [prompt_messages(c) for c in convs]
    refs = [c["messages"][-1]["content"].strip() for c in convs]
    m, tok = load_for_generation(model)
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        answers += chat_generate(m, tok, prompts[i:i + batch_size], max_new_tokens=max_new_tokens)
    hits = [a.strip() == r for a, r in zip(answers, refs)]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits),
            "examples": [{"reference": r, "answer": a} for r, a in list(zip(refs, answers))[:3]]}

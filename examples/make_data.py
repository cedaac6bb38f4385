"""Regenerate the small example datasets under examples/data/ (deterministic, seed 0).

- pretrain_tiny.json        text_only, sentences for continuous pretraining of tiny-llama
- sft_tiny.json             conversation, short instruction turns for tiny-llama
- kv2json_train.json        conversation: "Convert to JSON: name=...; age=...; city=..." -> one-line JSON
- kv2json_heldout.json      the same task with names and cities never seen in training
- preference_tiny.json      paired_conversation: the chosen answer answers the question; the rejected
                            one is a refusal ("I do not know.") or a degenerate repetition
- preference_t2t_tiny.json  the same as paired_text_to_text, with margins (1.0 refusal, 0.5 repetition)
The kv2json task is a format the SmolLM2 base model gets wrong (it adds prose and code
fences); a few minutes of LoRA on CPU teach it the exact one-line format.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent / "data"
rng = random.Random(0)

SUBJECTS = ["The cat", "A dog", "The bird", "My sister", "The farmer", "A child", "The king", "Our neighbor"]
VERBS = ["sees", "likes", "finds", "paints", "carries", "follows", "feeds", "draws"]
OBJECTS = ["the red ball", "a small boat", "the green tree", "a tall house", "the old clock", "a blue fish"]
PLACES = ["in the garden", "near the river", "at the market", "on the hill", "by the sea", "in the forest"]

NAMES_TRAIN = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena",
               "Marco", "Nina", "Oscar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
NAMES_HELDOUT = ["Umar", "Vera", "Wendell", "Ximena", "Yusuf", "Zoe", "Anya", "Boris"]
CITIES_TRAIN = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi", "Perth", "Riga"]
CITIES_HELDOUT = ["Madrid", "Nairobi", "Seoul", "Lisbon"]


def write(name, dtype, instances):
    (HERE / name).write_text(json.dumps({"type": dtype, "instances": instances}, indent=1) + "\n")


def preference_pairs(n):
    """(question, chosen answer, rejected answer, margin): a learnable preference for a tiny model."""
    out = []
    for i in range(n):
        s, v, o, p = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)
        question = f"Where does {s.lower()} {v.rstrip('s')} {o}?"
        chosen = f"{s} {v} {o} {p}."
        if i % 2:
            rejected, margin = rng.choice(["I do not know.", "No idea.", "I cannot say."]), 1.0
        else:
            word = rng.choice(o.split()[1:])
            rejected, margin = " ".join([word] * rng.randint(4, 8)) + ".", 0.5
        out.append((question, chosen, rejected, margin))
    return out


def kv2json(names, cities, n):
    out = []
    for _ in range(n):
        name, age, city = rng.choice(names), rng.randint(18, 90), rng.choice(cities)
        prompt = f"Convert to JSON: name={name}; age={age}; city={city}"
        answer = json.dumps({"name": name, "age": age, "city": city})
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return out


if __name__ == "__main__":
    HERE.mkdir(exist_ok=True)
    texts = [" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
                      for _ in range(rng.randint(3, 8))) for _ in range(300)]
    write("pretrain_tiny.json", "text_only", [{"text": t} for t in texts])
    sft = []
    for _ in range(256):
        s, v, o, p = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)
        sft.append({"system": "Answer briefly.", "messages": [
            {"role": "user", "content": f"Where does {s.lower()} {v.rstrip('s')} {o}?"},
            {"role": "assistant", "content": f"{s} {v} {o} {p}."}]})
    write("sft_tiny.json", "conversation", sft)
    write("kv2json_train.json", "conversation", kv2json(NAMES_TRAIN, CITIES_TRAIN, 160))
    write("kv2json_heldout.json", "conversation", kv2json(NAMES_HELDOUT, CITIES_HELDOUT, 24))
    pairs = preference_pairs(320)
    write("preference_tiny.json", "paired_conversation", [
        {"chosen": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c}]},
         "rejected": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}}
        for q, c, r, _ in pairs[:240]])
    write("preference_t2t_tiny.json", "paired_text_to_text", [
        {"prompt": q, "chosen": c, "rejected": r, "margin": m} for q, c, r, m in pairs[240:]])

"""Regenerate the small example datasets under examples/data/ (deterministic, seed 0).

- pretrain_tiny.json        text_only, sentences for continuous pretraining of tiny-llama
- sft_tiny.json             conversation, short instruction turns for tiny-llama
- kv2json_train.json        conversation: "Convert to JSON: name=...; age=...; city=..." -> one-line JSON
- kv2json_heldout.json      the same task with names and cities never seen in training
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

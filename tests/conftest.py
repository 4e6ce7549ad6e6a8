"""Shared fixtures: tiny random models in Hugging Face format, and the real default model."""

import json
from pathlib import Path

import pytest
import torch

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_byte_tokenizer(path: Path) -> int:
    """A byte-level tokenizer without merges: 256 byte tokens plus 3 specials. Returns vocab size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}))
    return len(vocab)


def write_word_tokenizer(path: Path, vocab_size: int) -> int:
    """A word-level tokenizer of `vocab_size` tokens t0, t1, ... (for tiny-vocabulary models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return vocab_size


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, vocab_size: int | None = None,
                    weight_std: float = 0.3) -> Path:
    """Save a 2-layer random model of `arch` (llama, qwen2, qwen3) with transformers.

    With `vocab_size` the tokenizer is word-level with that many tokens, else byte-level."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_word_tokenizer(path, vocab_size) if vocab_size else write_byte_tokenizer(path)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # noqa: C408
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, rope_theta=10000.0, eos_token_id=2, bos_token_id=None,
                  pad_token_id=0)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    extra = {"tie_word_embeddings": arch != "qwen2"}
    if arch == "qwen3":
        extra["head_dim"] = 32
    torch.manual_seed(seed)
    model = cls[1](cls[0](**common, **extra))
    with torch.no_grad():  # larger weights than the default init, so outputs are not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, weight_std)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def default_llm():
    """The real embedded default model in fp32 (the equivalence reference)."""
    from engine import LLM

    return LLM(dtype="float32", device="cpu")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Profiles (SPS tables) go to a per-session folder, never the user's cache."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old

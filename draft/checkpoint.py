"""Drafter checkpoints: a directory with `config.json` and `model.safetensors` (bf16).

The target's shared embedding and LM head are never saved: a drafter is rebuilt around the
target it serves. Shipped checkpoints live in draft/checkpoints/<name>/.
"""

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from draft.base import TargetHandle

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def resolve(name_or_dir: str) -> Path | None:
    """A shipped drafter's directory by name, or the given directory; None if neither."""
    for path in (SHIPPED_DIR / name_or_dir, Path(name_or_dir).expanduser()):
        if (path / CONFIG_FILE).is_file():
            return path
    return None


def save_drafter(model: torch.nn.Module, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write config.json (the model's config plus `extra`) and bf16 weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_json()
    cfg.update(extra or {})
    tensors = {k: v.detach().to("cpu", torch.bfloat16 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}  # weights bf16; ids (draft vocabulary) as they are
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return out


def build_model(cfg_json: dict, target: TargetHandle) -> torch.nn.Module:
    kind = cfg_json.get("kind", "dspark")
    if kind in ("dspark", "dflash"):
        from draft.dspark import DSparkConfig, DSparkModel

        return DSparkModel(DSparkConfig.from_json(cfg_json), target)
    if kind == "eagle3":
        from draft.eagle3 import Eagle3Config, Eagle3Model

        return Eagle3Model(Eagle3Config.from_json(cfg_json), target)
    if kind == "mtp":
        from draft.mtp import MTPConfig, MTPModel

        return MTPModel(MTPConfig.from_json(cfg_json), target)
    raise ValueError(f"unknown drafter kind {kind!r}")


def load_model(path: str | Path, target: TargetHandle, dtype: torch.dtype | None = None,
               device: torch.device | None = None) -> torch.nn.Module:
    """Rebuild a drafter around `target` and load its weights (in `dtype`, default the target's)."""
    path = Path(path)
    cfg_json = json.loads((path / CONFIG_FILE).read_text())
    model = build_model(cfg_json, target)
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                 for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise KeyError(f"drafter checkpoint {path}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model = model.to(device=device or target.device, dtype=dtype or target.dtype)
    model.rotary.reset_tables() if hasattr(model, "rotary") else None
    return model.eval()

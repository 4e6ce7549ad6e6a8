"""`dspark draft train`: one trainer for every learned drafter.

Random anchors over the target-generated sequences of the cache; loss 0.1 CE + 0.9 TV + 1.0
confidence BCE with position-decay weights (draft/training/losses.py); AdamW with linear
warm-up and cosine decay, gradient clipping, fp32 master weights with bf16 autocast; training
state saved every `save_every` steps and resumed from `out_dir/train_state.pt`; the exported
drafter (config.json + bf16 model.safetensors) is written at every save. Under `torchrun` the
global batch is split over the ranks (draft/training/distributed.py).
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from draft.base import TargetHandle
from draft.checkpoint import CONFIG_FILE, WEIGHTS_FILE, build_model, resolve, save_drafter
from draft.training import distributed
from draft.training.anchors import sample_anchors
from draft.training.cache import Sequence, load_sequences
from draft.training.losses import LossWeights, drafter_loss
from draft.training.vocab import top_tokens

logger = logging.getLogger(__name__)

STATE_FILE, LOG_FILE = "train_state.pt", "train_log.jsonl"
# what a checkpoint's config.json says about its own training and calibration, not its shape
INIT_DROPPED_KEYS = ("train", "calibration", "confidence_temperatures", "confidence_biases", "draft_vocab_coverage")

# Defaults per drafter for the default 135M target (see draft/README.md for the reasoning).
DEFAULT_CONFIGS: dict[str, dict] = {
    "dspark": {"kind": "dspark", "num_layers": 2, "head": "markov", "head_rank": 32},
    "dspark-rnn": {"kind": "dspark", "num_layers": 2, "head": "rnn", "head_rank": 32},
    "dflash": {"kind": "dflash", "num_layers": 2, "head": "none"},
    "eagle3": {"kind": "eagle3"},
    "mtp": {"kind": "mtp"},
}


@dataclass(frozen=True, slots=True)
class TrainConfig:
    data_dir: str
    out_dir: str
    draft: str = "dspark"
    model: str | None = None
    overrides: dict = field(default_factory=dict)
    steps: int = 1000
    batch_blocks: int = 64
    anchors_per_seq: int = 16
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    dtype: str = "bfloat16"
    device: str | None = None
    save_every: int = 100
    log_every: int = 10
    max_minutes: float | None = None
    # A wall-clock budget: the cosine spans these minutes of training (summed over resumed
    # runs) instead of `steps`, and training stops when they are spent. Drafters of different
    # step costs then get the same time each; the step count reached is logged.
    schedule_minutes: float | None = None
    stop_step: int | None = None  # stop (and save) here without changing the LR schedule
    seed: int = 0
    loss: LossWeights = field(default_factory=LossWeights)
    # steps of forward KL alone (the confidence BCE kept) before `loss` takes over
    kl_warmup: int = 0
    # the draft vocabulary: the most frequent tokens of the training sequences (0: all)
    draft_vocab_size: int = 16384
    # start `fc` (DSpark/DFlash) as a pass-through of the deepest injected layer, the one that
    # carries the most next-token information, instead of a random mix of all of them
    fc_pass_last: bool = False
    # continue from a trained checkpoint's weights (its architecture; a fresh optimizer, the
    # draft vocabulary picked anew from this data, confidences to be recalibrated)
    init_from: str | None = None


def load_target(model: str | None, device: str, dtype: torch.dtype) -> tuple[TargetHandle, str]:
    """The frozen target (through our engine's loader); returns its shared parts and name."""
    from engine import LLM

    llm = LLM(model=model, device=device, dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
              num_blocks=1)
    eng = llm.engine
    for p in eng.model.parameters():
        p.requires_grad_(False)
    return eng._target_handle(), eng.model_name


def lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule_minutes is not None:
        progress = elapsed_s / (60 * cfg.schedule_minutes)
    else:
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def anchors_of(seqs: list[Sequence], anchors_per_seq: int, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random anchors of these sequences (token counts only, no features read)."""
    return sample_anchors([s.num_prompt_tokens for s in seqs], [len(s.token_ids) for s in seqs],
                          anchors_per_seq, gen)


def sample_batch(seqs: list[Sequence], num_seqs: int, anchors_per_seq: int, gen: torch.Generator
                 ) -> tuple[list[Sequence], torch.Tensor, torch.Tensor]:
    """A global batch: random sequences and their anchors."""
    chosen = [seqs[i] for i in torch.randint(len(seqs), (num_seqs,), generator=gen).tolist()]
    return chosen, *anchors_of(chosen, anchors_per_seq, gen)


def make_batch(seqs: list[Sequence], anchors: torch.Tensor, keep: torch.Tensor, device) -> dict:
    lengths = [len(s.token_ids) for s in seqs]
    s_max = max(lengths)
    feats = [s.features for s in seqs]  # read from the shards once
    token_ids = torch.zeros(len(seqs), s_max, dtype=torch.long)
    features = torch.zeros(len(seqs), s_max, feats[0].shape[1], dtype=feats[0].dtype)
    final = torch.zeros(len(seqs), s_max, seqs[0].final.shape[1], dtype=seqs[0].final.dtype)
    for b, s in enumerate(seqs):
        n = lengths[b]
        token_ids[b, :n], features[b, :n], final[b, :n] = s.token_ids, feats[b], s.final
    to = {"device": device}
    return {"token_ids": token_ids.to(**to), "features": features.to(**to), "final": final.to(**to),
            "num_tokens": torch.tensor(lengths, **to), "anchors": anchors.to(**to), "keep": keep.to(**to)}


def target_probs(target: TargetHandle, final: torch.Tensor, label_pos: torch.Tensor,
                 rows: torch.Tensor | None) -> torch.Tensor:
    """The target's probabilities at every label position, over the full vocabulary or only its
    `rows` (not renormalised): final [B, S, hidden], label_pos [B, N, γ] -> [B, N, γ, V'].

    Overlapping blocks share label positions (γ blocks cover each one), so the target's LM head
    and softmax run once per distinct position of each sequence."""
    bsz, seq = final.shape[:2]
    flat = (label_pos + seq * torch.arange(bsz, device=label_pos.device).view(-1, 1, 1)).reshape(-1)
    uniq, inverse = torch.unique(flat, return_inverse=True)  # distinct (sequence, position) rows
    h = final.reshape(bsz * seq, -1).index_select(0, uniq)
    with torch.no_grad():
        logp = target.lm_head(h.to(target.dtype)).float().log_softmax(-1)  # [U, V]
        if rows is not None:
            logp = logp.index_select(1, rows)
        probs = logp.exp()
    return probs.index_select(0, inverse).view(*label_pos.shape, -1)


def label_columns(labels: torch.Tensor, rows: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Token ids -> their column among the draft vocabulary `rows` (−1 when outside it)."""
    if rows is None:
        return labels
    column = torch.full((vocab_size,), -1, dtype=torch.long, device=labels.device)
    column[rows] = torch.arange(rows.numel(), device=labels.device)
    return column[labels]


class TrainStep(torch.nn.Module):
    """The drafter's teacher-forced forward as a module's `forward`, which DDP hooks."""

    def __init__(self, drafter: torch.nn.Module) -> None:
        super().__init__()
        self.drafter = drafter

    def forward(self, token_ids, features, num_tokens, anchors, keep):
        return self.drafter.train_forward(token_ids, features, num_tokens, anchors, keep)


def compute_loss(model, target: TargetHandle, batch: dict, weights: LossWeights, autocast: bool,
                 step: torch.nn.Module | None = None):
    """`step`: the (DDP-wrapped) TrainStep of `model`; None runs the model's forward directly."""
    device = batch["token_ids"].device
    forward = step if step is not None else model.train_forward
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits, conf, label_pos, mask = forward(
            batch["token_ids"], batch["features"], batch["num_tokens"], batch["anchors"], batch["keep"])
    rows = getattr(model, "draft_vocab", None)
    probs = target_probs(target, batch["final"], label_pos, rows)
    next_pos = (label_pos + 1).clamp(max=batch["token_ids"].shape[1] - 1)
    labels = batch["token_ids"].gather(1, next_pos.reshape(label_pos.shape[0], -1)).view_as(label_pos)
    labels = label_columns(labels, rows, target.vocab_size)
    return drafter_loss(logits, probs, labels, mask, conf, weights)


@torch.no_grad()
def init_fc_pass_last(model) -> None:
    """fc := [0 ... 0 I]: the projected context starts as the deepest layer's hidden state."""
    fc = getattr(model, "fc", None)
    h = model.config.hidden_size
    if fc is None or fc.weight.shape != (h, len(model.config.target_layers) * h):
        raise ValueError(f"{model.config.kind} has no multi-layer fc to initialise")
    fc.weight.zero_()
    fc.weight[:, -h:] = torch.eye(h, dtype=fc.weight.dtype, device=fc.weight.device)


def validate(model, target: TargetHandle, heldout: list[Sequence]) -> dict:
    """Held-out acceptance of fully supervised blocks (16 fixed anchors in each of the first 64
    held-out sequences): α_k = mean Σ min(p_d, p_t) at position k given the true prefix, and
    τ = mean of 1 + Σ_k Π_{i<=k} α_i per block (the expected tokens per round at γ)."""
    from draft.training.calibrate import collect

    was_training = model.training
    model.eval()
    try:
        _, accept = collect(model, target, heldout[:64], None, seed=0, anchors_per_seq=16)
    finally:
        model.train(was_training)
    return {"val_accept": [round(float(a), 4) for a in accept.mean(0)],
            "val_tau": round(float((1 + accept.cumprod(-1).sum(-1)).mean()), 4),
            "val_blocks": int(accept.shape[0])}


def train(cfg: TrainConfig) -> Path:
    dp = distributed.start()
    try:
        return _train(cfg, dp)
    finally:
        distributed.stop(dp)


def _train(cfg: TrainConfig, dp: distributed.DataParallel) -> Path:
    device = dp.device(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target, target_name = load_target(cfg.model, str(device), torch.bfloat16)
    model_cfg = dict(DEFAULT_CONFIGS.get(cfg.draft, {"kind": cfg.draft}))
    init_dir = None
    if cfg.init_from:
        init_dir = resolve(cfg.init_from)
        if init_dir is None:
            raise FileNotFoundError(f"no drafter checkpoint at {cfg.init_from}")
        model_cfg = {k: v for k, v in json.loads((init_dir / CONFIG_FILE).read_text()).items()
                     if k not in INIT_DROPPED_KEYS}
    vocab = cfg.draft_vocab_size if cfg.draft_vocab_size < target.vocab_size else 0
    model_cfg["draft_vocab_size"] = vocab
    model_cfg.update(cfg.overrides)
    model_cfg.update(hidden_size=target.hidden_size, vocab_size=target.vocab_size, target_model=target_name)
    n = target.num_layers
    if "target_layers" not in model_cfg and model_cfg["kind"] in ("dspark", "dflash"):
        model_cfg["target_layers"] = sorted({round(1 + i * (n - 2) / 4) for i in range(5)})
    if "target_layers" not in model_cfg and model_cfg["kind"] == "mtp":
        model_cfg["target_layers"] = [n - 1]
    model = build_model(model_cfg, target).to(device).train()
    layers = tuple(model.config.target_layers)
    if cfg.fc_pass_last:
        init_fc_pass_last(model)
    if init_dir is not None:
        weights = {k: v.float() for k, v in load_file(str(init_dir / WEIGHTS_FILE)).items()
                   if k != "draft_vocab"}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"draft_vocab"}:
            raise KeyError(f"{init_dir}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    seqs = [s for s in load_sequences(Path(cfg.data_dir) / "cache", "train", layers)
            if len(s.token_ids) - s.num_prompt_tokens >= 2]
    if not seqs:
        raise ValueError(f"no training sequences in {cfg.data_dir}")
    heldout = load_sequences(Path(cfg.data_dir) / "cache", "heldout", layers)
    if getattr(model, "draft_vocab", None) is not None:
        ids, coverage = top_tokens(seqs, heldout, model.draft_vocab.numel(), target.vocab_size)
        model.draft_vocab.copy_(ids.to(device))
        logger.info("draft vocabulary of %d tokens covers %s of held-out response tokens",
                    ids.numel(), "?" if coverage is None else f"{coverage:.1%}")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    trained_s = 0.0  # wall time spent training, over every resumed run
    state_path = out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step = state["step"]
        trained_s = state.get("trained_s", 0.0)
        logger.info("resumed %s at step %d", out, step)
    step_module = dp.wrap(TrainStep(model))
    num_params = sum(p.numel() for p in params)
    logger.info("training %s (%.2fM parameters, target layers %s) on %d sequences, %s%s",
                model_cfg["kind"], num_params / 1e6, list(layers), len(seqs), device,
                f", rank {dp.rank} of {dp.world_size}" if dp.enabled else "")
    autocast = cfg.dtype in ("bfloat16", "bf16")
    seqs_per_step = max(dp.world_size, cfg.batch_blocks // cfg.anchors_per_seq)  # global
    warmup_weights = LossWeights(ce=0.0, tv=0.0, kl=1.0, confidence=cfg.loss.confidence,
                                 decay=cfg.loss.decay)
    t0 = time.perf_counter() - trained_s
    bar = tqdm(total=None if cfg.schedule_minutes else cfg.steps, initial=step, desc=f"train {model_cfg['kind']}",
               unit="step", disable=not dp.is_main)
    log = open(out / LOG_FILE, "a") if dp.is_main else open(os.devnull, "w")  # noqa: SIM115 (closed in the finally)
    running: dict[str, float] = {}

    def save() -> None:
        if not dp.is_main:
            return
        if heldout:
            log.write(json.dumps({"step": step, "elapsed_s": round(time.perf_counter() - t0, 1),
                                  **validate(model, target, heldout)}) + "\n")
            log.flush()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "generator": gen.get_state(), "step": step,
                    "trained_s": time.perf_counter() - t0}, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)
        save_drafter(model, out, {"train": {"steps": step, "data": str(cfg.data_dir),
                                            "batch_blocks": cfg.batch_blocks, "lr": cfg.lr,
                                            "num_sequences": len(seqs), "init_from": cfg.init_from,
                                            "trained_s": round(time.perf_counter() - t0)}})

    try:
        while cfg.schedule_minutes is not None or step < min(cfg.steps, cfg.stop_step or cfg.steps):
            chosen, anchors, keep = sample_batch(seqs, seqs_per_step, cfg.anchors_per_seq, gen)
            mine = dp.shard(list(range(len(chosen))))
            batch = make_batch([chosen[i] for i in mine], anchors[mine], keep[mine], device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, time.perf_counter() - t0)
            weights = cfg.loss if step >= cfg.kl_warmup else warmup_weights
            loss, metrics = compute_loss(model, target, batch, weights, autocast, step_module)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
            opt.step()
            metrics = dp.mean(metrics)
            step += 1
            for k, v in metrics.items():
                running[k] = running.get(k, 0.0) + v
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                avg = {k: v / n for k, v in running.items()}
                running.clear()
                bar.set_postfix(loss=f"{avg['loss']:.3f}", tv=f"{avg['tv']:.3f}", acc=f"{avg['accept']:.3f}")
                log.write(json.dumps({"step": step, "lr": opt.param_groups[0]["lr"],
                                      "elapsed_s": round(time.perf_counter() - t0, 1), **avg}) + "\n")
                log.flush()
            if step % cfg.save_every == 0:
                save()
            if cfg.stop_step is not None and step >= cfg.stop_step:
                break
            minutes = (time.perf_counter() - t0) / 60
            over_max = cfg.max_minutes is not None and minutes > cfg.max_minutes
            over_schedule = cfg.schedule_minutes is not None and minutes > cfg.schedule_minutes
            if dp.agree(over_max or over_schedule):  # one broadcast: rank 0's clock decides
                if over_max:
                    logger.info("stopping at step %d after %.1f minutes", step, cfg.max_minutes)
                else:
                    logger.info("wall-clock schedule spent at step %d", step)
                break
        if step % cfg.save_every or step == 0:  # not saved just now
            save()
    finally:
        bar.close()
        log.close()
    return out

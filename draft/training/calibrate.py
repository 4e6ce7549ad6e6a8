"""Sequential Temperature Scaling (STS) of the confidence head, and calibration metrics.

The scheduler ranks draft positions by the survival probability a_k = Π_{i<=k} c_i. STS fits
one temperature and one bias per position, left to right: c_k = sigmoid(z_k / T_k + b_k) with
(T_k, b_k) chosen by a grid search to minimise the ECE of a_k (earlier terms fixed). A temperature
alone cannot remove an offset (a head that over-predicts a low acceptance rate), hence the bias
(Platt scaling); ties go to the smallest |b_k|, so a bias is used only where it lowers the ECE.
Each T_k > 0 makes c_k a monotone map of z_k, so the order of confidences at a position is kept.

Calibration targets: on held-out target-generated data the probability that draft token k is
accepted given its prefix was is c*_k = 1 − ½‖p_d,k − p_t,k‖₁ (exact for rejection sampling), so
the true survival is S_k = Π_{i<=k} c*_i. ECE_k = Σ_bins (n_b / N) |mean(a_k) − mean(S_k)| over
15 equal-width bins of a_k. AUC_k: how well a_k ranks realised survival (Bernoulli draws of the
acceptances with a fixed seed). Temperatures are fitted on half of the held-out responses and
the metrics reported on the other half.
"""

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GRID = torch.logspace(-1.0, 1.0, 161)  # temperatures 0.1 .. 10
BIAS_GRID = sorted(torch.linspace(-2.0, 2.0, 81).tolist(), key=abs)  # 0 first: ties keep b = 0


def ece(pred: torch.Tensor, target: torch.Tensor, num_bins: int = 15) -> float:
    """Expected calibration error of predictions [N] in [0, 1] against (soft) targets [N]."""
    bins = (pred * num_bins).long().clamp(max=num_bins - 1)
    total = torch.zeros(num_bins).index_add_(0, bins, torch.ones_like(pred))
    gap = torch.zeros(num_bins).index_add_(0, bins, pred - target).abs()
    return float(gap.sum() / total.sum().clamp(min=1))


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); nan without both classes."""
    pos, n = int(label.sum()), label.numel()
    if pos == 0 or pos == n:
        return float("nan")
    order = score.argsort()
    ranks = torch.empty(n, dtype=torch.float64)
    sorted_scores = score[order]
    i = 0
    while i < n:  # average ranks of ties
        j = i
        while j + 1 < n and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[label.bool()].sum() - pos * (pos + 1) / 2) / (pos * (n - pos)))


def survival(conf: torch.Tensor) -> torch.Tensor:
    return conf.cumprod(dim=-1)


def fit_sts(logits: torch.Tensor, accept: torch.Tensor, mask: torch.Tensor | None = None
            ) -> tuple[list[float], list[float]]:
    """Per-position temperatures and biases, left to right. logits/accept [N, γ] (blocks fully
    supervised; `mask` [N] selects usable rows)."""
    if mask is not None:
        logits, accept = logits[mask], accept[mask]
    target = survival(accept)
    temps: list[float] = []
    biases: list[float] = []
    prefix = torch.ones(logits.shape[0])
    for k in range(logits.shape[1]):
        z, s = logits[:, k], target[:, k]
        best_t, best_b, best_e = 1.0, 0.0, ece(prefix * torch.sigmoid(z), s)
        for b in BIAS_GRID:
            for t in GRID.tolist():
                e = ece(prefix * torch.sigmoid(z / t + b), s)
                if e < best_e - 1e-9:
                    best_t, best_b, best_e = t, b, e
        temps.append(best_t)
        biases.append(best_b)
        prefix = prefix * torch.sigmoid(z / best_t + best_b)
    return temps, biases


def calibration_report(logits: torch.Tensor, accept: torch.Tensor, temps: list[float] | None,
                       biases: list[float] | None = None, seed: int = 0) -> dict:
    """Per-position ECE (of a_k vs S_k) and AUC (a_k vs realised survival)."""
    t = torch.tensor(temps or [1.0] * logits.shape[1])
    b = torch.tensor(biases or [0.0] * logits.shape[1])
    a = survival(torch.sigmoid(logits / t + b))
    s = survival(accept)
    gen = torch.Generator().manual_seed(seed)
    realised = survival((torch.rand(accept.shape, generator=gen) < accept).float())
    return {"ece": [ece(a[:, k], s[:, k]) for k in range(a.shape[1])],
            "auc": [auc(a[:, k], realised[:, k]) for k in range(a.shape[1])],
            "mean_survival_pred": a.mean(0).tolist(), "mean_survival_true": s.mean(0).tolist()}


@torch.no_grad()
def collect(model, target, seqs, max_blocks: int | None, seed: int, anchors_per_seq: int = 128
            ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Confidence logits (None without a confidence head) and soft acceptance labels [N, γ] of
    fully supervised held-out blocks (at most `max_blocks`; None: from every sequence).

    Many anchors per sequence and every sequence: blocks of one response are correlated, so
    the number of responses, not of blocks, bounds how well a 15-bin ECE is measured."""
    batch_seqs = max(1, 64 // anchors_per_seq)  # ~64 blocks per forward bounds the [N, γ, V] logits
    from draft.training.losses import acceptance_labels, tv_distance
    from draft.training.trainer import anchors_of, make_batch, target_probs

    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    rows = getattr(model, "draft_vocab", None)  # logits cover the draft vocabulary only
    logits_all, accept_all = [], []
    count = 0
    for start in range(0, len(seqs), batch_seqs):
        part = seqs[start:start + batch_seqs]
        batch = make_batch(part, *anchors_of(part, anchors_per_seq, gen), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cpu"):
            d_logits, conf, label_pos, mask = model.train_forward(
                batch["token_ids"], batch["features"], batch["num_tokens"], batch["anchors"], batch["keep"])
        accept = acceptance_labels(tv_distance(d_logits, target_probs(target, batch["final"], label_pos, rows)))
        full = mask.all(-1)
        if conf is not None:
            logits_all.append(conf[full].float())
        accept_all.append(accept[full].float())
        count += int(full.sum())
        if max_blocks is not None and count >= max_blocks:
            break
    logits = torch.cat(logits_all)[:max_blocks] if logits_all else None
    return logits, torch.cat(accept_all)[:max_blocks]


def calibrate_checkpoint(data_dir: str, ckpt_dir: str, model_name: str | None = None,
                         max_blocks: int | None = None, seed: int = 0, anchors_per_seq: int = 128) -> dict:
    """Fit STS on the held-out split; store the temperatures in the checkpoint's config."""
    from draft.checkpoint import CONFIG_FILE, load_model, resolve
    from draft.training.cache import load_sequences
    from draft.training.trainer import load_target

    path = resolve(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"no drafter checkpoint at {ckpt_dir}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target, _ = load_target(model_name, device, torch.bfloat16)
    model = load_model(path, target, dtype=torch.float32)
    seqs = load_sequences(Path(data_dir) / "cache", "heldout", tuple(model.config.target_layers))
    # fit on half the held-out responses, report on the other half (out of sample)
    half = None if max_blocks is None else max_blocks // 2
    logits, accept = collect(model, target, seqs[::2], half, seed, anchors_per_seq)
    if logits is None:
        raise ValueError("this drafter has no confidence head")
    test_logits, test_accept = collect(model, target, seqs[1::2], half, seed + 1, anchors_per_seq)
    logger.info("calibrating on %d held-out blocks, reporting on %d others", logits.shape[0],
                test_logits.shape[0])
    temps, biases = fit_sts(logits, accept)
    before = calibration_report(test_logits, test_accept, None, seed=seed)
    after = calibration_report(test_logits, test_accept, temps, biases, seed=seed)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg["confidence_temperatures"] = temps
    cfg["confidence_biases"] = biases
    cfg["calibration"] = {"num_blocks": int(logits.shape[0]), "num_report_blocks": int(test_logits.shape[0]),
                          "ece_before": before["ece"],
                          "ece_after": after["ece"], "auc_before": before["auc"], "auc_after": after["auc"]}
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return {"checkpoint": str(path), "num_blocks": int(logits.shape[0]),
            "num_report_blocks": int(test_logits.shape[0]), "temperatures": temps,
            "biases": biases, "before": before, "after": after}

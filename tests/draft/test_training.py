"""Training pieces: anchors, loss terms, and resumable data generation and training on a tiny
target."""

import json

import pytest
import torch

from draft.training.anchors import block_labels, sample_anchors
from draft.training.losses import (
    LossWeights,
    acceptance_labels,
    decay_weights,
    drafter_loss,
    tv_distance,
)


def test_anchor_sampling_stays_in_the_response():
    gen = torch.Generator().manual_seed(0)
    prompt, total = [5, 3, 10], [20, 5, 11]
    for _ in range(50):
        a, keep = sample_anchors(prompt, total, 4, gen)
        for b in range(3):
            chosen = a[b][keep[b]].tolist()
            assert chosen == sorted(set(chosen))  # distinct, sorted
            assert all(prompt[b] <= x <= total[b] - 2 for x in chosen)
        assert keep[0].all() and keep[1].sum() == 1 and keep[2].sum() == 0
    # the whole valid range is covered over draws
    seen = set()
    for _ in range(200):
        a, keep = sample_anchors([2], [9], 2, gen)
        seen |= set(a[0][keep[0]].tolist())
    assert seen == set(range(2, 8))


def test_block_labels_mask_the_sequence_end():
    token_ids = torch.arange(10)[None] + 100  # T = 10
    prev, pos, mask = block_labels(token_ids, torch.tensor([10]), torch.tensor([[6, 8]]),
                                   torch.tensor([[True, True]]), 3)
    assert prev[0, 0].tolist() == [106, 107, 108]  # anchor, then the true tokens
    assert pos[0, 0].tolist() == [6, 7, 8]
    assert mask[0].tolist() == [[True, True, True], [True, False, False]]  # label of 9 needs 10


def test_loss_terms():
    torch.manual_seed(0)
    d, t = torch.randn(2, 3, 4, 11), torch.randn(2, 3, 4, 11)
    tv = tv_distance(d, t)
    assert torch.allclose(tv, (d.softmax(-1) - t.softmax(-1)).abs().sum(-1))
    assert tv.min() >= 0 and tv.max() <= 2
    assert torch.allclose(tv_distance(t, t), torch.zeros(2, 3, 4), atol=1e-6)
    # soft label = exact acceptance probability of rejection sampling: sum min(p_d, p_t)
    assert torch.allclose(acceptance_labels(tv), torch.minimum(d.softmax(-1), t.softmax(-1)).sum(-1), atol=1e-6)
    w = decay_weights(4, 2.0)
    assert torch.allclose(w, torch.exp(-torch.arange(4.0) / 2)) and decay_weights(3, 0).eq(1).all()
    labels = torch.randint(11, (2, 3, 4))
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 2, 1:] = False
    conf = torch.randn(2, 3, 4)
    loss, _ = drafter_loss(d, t, labels, mask, conf, LossWeights(decay=2.0))
    ww = w * mask
    ce = torch.nn.functional.cross_entropy(d.flatten(0, 2), labels.flatten(), reduction="none").view(2, 3, 4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(conf, acceptance_labels(tv), reduction="none")
    expected = ((0.1 * ce + 0.9 * tv + 1.0 * bce) * ww).sum() / ww.sum()
    assert torch.allclose(loss, expected, atol=1e-5)
    # masked positions do not matter; BCE gradient vanishes at the soft label
    d2 = d.clone()
    d2[1, 2, 3] += 100
    assert torch.allclose(drafter_loss(d2, t, labels, mask, conf)[0], drafter_loss(d, t, labels, mask, conf)[0])
    c = torch.logit(acceptance_labels(tv)).requires_grad_()
    drafter_loss(d, t, labels, mask, c, LossWeights(ce=0, tv=0))[0].backward()
    assert c.grad.abs().max() < 1e-6


PROMPTS = [{"turns": [f"Say hello number {i}"]} for i in range(6)]


@pytest.fixture(scope="module")
def tiny_data(tiny_model_dir, tmp_path_factory):
    """Tiny data generation, interrupted after its first batch and resumed."""
    from draft.training import data as data_mod
    from draft.training.cache import CacheWriter, load_manifest, load_sequences

    root = tmp_path_factory.mktemp("draft-data")
    prompts = root / "chat_tiny.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    cfg = data_mod.DataConfig((str(prompts),), str(root / "data"), model=str(tiny_model_dir),
                              dtype="float32", max_prompts_per_file=6, max_new_tokens=12,
                              temperature=1.0, top_p=1.0, heldout_fraction=0.34, batch_size=4)
    calls = []
    original = CacheWriter.write

    def failing_write(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args)

    CacheWriter.write = failing_write
    try:
        with pytest.raises(KeyboardInterrupt):
            data_mod.generate(cfg, (0, 1))
    finally:
        CacheWriter.write = original
    assert len(load_manifest(root / "data" / "cache")["shards"]) == 1
    data_mod.generate(cfg, (0, 1))  # resumes with the unfinished prompts
    rows = data_mod.read_responses(root / "data")
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted(f"chat_tiny:{i}:0" for i in range(6))
    seqs = load_sequences(root / "data" / "cache")
    assert sorted(s.key for s in seqs) == sorted(keys)
    assert {s.split for s in seqs} == {"train", "heldout"}
    for s in seqs:
        row = next(r for r in rows if r["key"] == s.key)
        assert s.token_ids.tolist() == (row["prompt_ids"] + row["response_ids"])[:len(s.token_ids)]
        assert len(s.token_ids) == len(row["prompt_ids"]) + len(row["response_ids"]) - 1
    return root / "data"


TINY_OVERRIDES = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 64,
                  "max_positions": 512, "target_layers": [0, 1], "block_size": 4, "head_rank": 8}


def _train(data, tiny_model_dir, out, steps, **kw):
    from draft.training.trainer import TrainConfig, train

    cfg = TrainConfig(data_dir=str(data), out_dir=str(out), model=str(tiny_model_dir),
                      overrides=TINY_OVERRIDES, steps=steps, batch_blocks=8, anchors_per_seq=4,
                      warmup=2, save_every=2, log_every=1, device="cpu", **kw)
    return train(cfg)


def test_training_resumes_exactly(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from draft.checkpoint import load_model
    from draft.training import trainer

    straight = _train(tiny_data, tiny_model_dir, tmp_path / "a", 6)
    log = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all(k in log[0] for k in ("loss", "ce", "tv", "bce", "grad_norm", "lr"))

    original = trainer.compute_loss
    calls = []

    def interrupt_at_5(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(trainer, "compute_loss", interrupt_at_5)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_data, tiny_model_dir, tmp_path / "b", 6)
    monkeypatch.setattr(trainer, "compute_loss", original)
    resumed = _train(tiny_data, tiny_model_dir, tmp_path / "b", 6)  # from the step-4 save
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    from tests.draft.helpers import tiny_llm

    llm = tiny_llm(tiny_model_dir)
    model = load_model(resumed, llm.engine._target_handle())
    assert model.config.block_size == 4 and json.loads((resumed / "config.json").read_text())["train"]["steps"] == 6


def test_calibrate_fits_on_half_the_heldout_and_reports_on_the_rest(tiny_data, tiny_model_dir, tmp_path):
    from draft.training.calibrate import calibrate_checkpoint

    ckpt = _train(tiny_data, tiny_model_dir, tmp_path / "c", 2)
    report = calibrate_checkpoint(str(tiny_data), str(ckpt), str(tiny_model_dir))
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["confidence_temperatures"] == report["temperatures"] and len(report["temperatures"]) == 4
    assert report["num_blocks"] > 0 and report["num_report_blocks"] > 0
    assert cfg["calibration"]["num_report_blocks"] == report["num_report_blocks"]
    assert len(cfg["calibration"]["ece_after"]) == 4

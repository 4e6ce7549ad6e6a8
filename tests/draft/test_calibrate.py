"""Sequential Temperature Scaling: order preserving, lowers the ECE of the survival product."""

import torch

from draft.training.calibrate import auc, calibration_report, ece, fit_sts, survival


def test_ece_and_auc_basics():
    p = torch.tensor([0.1, 0.1, 0.9, 0.9])
    assert ece(p, p) == 0.0
    assert abs(ece(p, torch.tensor([0.3, 0.3, 0.6, 0.6])) - 0.25) < 1e-6
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5


def test_sts_is_order_preserving_and_lowers_ece():
    gen = torch.Generator().manual_seed(0)
    n, gamma = 4000, 5
    true_logit = 2.0 * torch.randn(n, gamma, generator=gen) + 0.5
    accept = torch.sigmoid(true_logit)  # the true conditional acceptance
    # an over-confident head at early positions, under-confident later, plus noise
    scale = torch.tensor([3.0, 2.0, 1.0, 0.6, 0.4])
    raw = true_logit * scale + 0.2 * torch.randn(n, gamma, generator=gen)
    temps, biases = fit_sts(raw, accept)
    assert all(t > 0 for t in temps) and temps[0] > 1.5 and temps[-1] < 0.8
    before = calibration_report(raw, accept, None)
    after = calibration_report(raw, accept, temps, biases)
    assert all(a <= b + 1e-9 for a, b in zip(after["ece"], before["ece"]))
    assert sum(after["ece"]) < 0.5 * sum(before["ece"]) and max(after["ece"]) < 0.03
    for k in range(gamma):  # same ranking at every position (ties only where sigmoid saturates)
        order = raw[:, k].argsort()
        calibrated = (raw[order, k] / temps[k] + biases[k]).sigmoid()
        assert (calibrated[1:] >= calibrated[:-1]).all()
    # a_k = Π c_i is non-increasing in k
    a = survival(torch.sigmoid(raw / torch.tensor(temps) + torch.tensor(biases)))
    assert (a[:, 1:] <= a[:, :-1] + 1e-7).all()


def test_sts_bias_removes_an_offset_a_temperature_cannot():
    """A head that over-predicts a low acceptance rate by a constant offset: dividing the logit
    by any temperature leaves a gap at the mean; the fitted bias closes it."""
    gen = torch.Generator().manual_seed(1)
    n = 4000
    true_logit = 1.2 * torch.randn(n, 1, generator=gen) - 0.8
    accept = torch.sigmoid(true_logit)
    raw = true_logit + 0.6
    temp_only = min(calibration_report(raw, accept, [t])["ece"][0] for t in torch.logspace(-1, 1, 161).tolist())
    temps, biases = fit_sts(raw, accept)
    after = calibration_report(raw, accept, temps, biases)["ece"][0]
    assert temp_only > 0.03 and after < 0.01 and -0.8 < biases[0] < -0.4

import pytest

from scheduler.sps import SPSTable


def test_interpolation_extrapolation_and_smoothing(tmp_path):
    t = SPSTable.from_measurements({1: 0.010, 8: 0.013, 4: 0.015, 32: 0.030}, key="k")
    assert t.step_seconds == (0.010, 0.013, 0.013, 0.030)  # the slow outlier at 4 is capped
    assert t(1) == pytest.approx(100.0)
    assert t.step_time(2) == pytest.approx(0.011)
    assert t.step_time(20) == pytest.approx(0.013 + 0.017 * 12 / 24)
    assert t.step_time(56) == pytest.approx(0.030 + 0.017 * 24 / 24)  # extrapolated
    path = tmp_path / "t.json"
    path.write_text(t.to_json())
    assert SPSTable.load(path) == t


def test_rejects_bad_tables():
    with pytest.raises(ValueError):
        SPSTable((1, 2), (0.1,))
    with pytest.raises(ValueError):
        SPSTable((2, 1), (0.1, 0.2))

"""The engine's measured throughput curve: steps per second when a step carries B tokens."""

import bisect
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class SPSTable:
    """Step time measured at a few batch sizes B, interpolated linearly in between and
    extrapolated along the last segment beyond. `sps(B)` = 1 / step time."""

    batch_sizes: tuple[int, ...]  # ascending
    step_seconds: tuple[float, ...]
    key: str = ""  # what it was measured on (model, device, dtype, threads)

    def __post_init__(self) -> None:
        if len(self.batch_sizes) != len(self.step_seconds) or not self.batch_sizes:
            raise ValueError("an SPS table needs one step time per batch size")
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)):
            raise ValueError("batch sizes must be ascending and distinct")

    @classmethod
    def from_measurements(cls, seconds: dict[int, float], key: str = "") -> "SPSTable":
        """Smooth raw timings: a step never gets faster by carrying more tokens, and timing
        noise only ever adds time, so each step time is capped by the fastest measurement at
        any larger batch (running minimum from the right)."""
        sizes = sorted(seconds)
        smoothed, floor = [], float("inf")
        for b in reversed(sizes):
            floor = min(floor, seconds[b])
            smoothed.append(floor)
        return cls(tuple(sizes), tuple(reversed(smoothed)), key)

    def step_time(self, batch: int) -> float:
        xs, ys = self.batch_sizes, self.step_seconds
        if len(xs) == 1 or batch <= xs[0]:
            return ys[0]
        i = min(bisect.bisect_left(xs, batch), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (batch - x0) / (x1 - x0)

    def __call__(self, batch: int) -> float:
        return 1.0 / self.step_time(batch)

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "batch_sizes": list(self.batch_sizes),
                           "step_seconds": list(self.step_seconds)}, indent=2)

    @classmethod
    def load(cls, path: Path) -> "SPSTable":
        d = json.loads(Path(path).read_text())
        return cls(tuple(d["batch_sizes"]), tuple(d["step_seconds"]), d.get("key", ""))

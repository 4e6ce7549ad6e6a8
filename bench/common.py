"""Helpers shared by the benchmarks: prompt files, result files, statistics."""

import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SHARED_PROMPTS = REPO.parent / "shared" / "data" / "prompts"


def load_turns(path: Path, limit: int | None = None) -> list[str]:
    """First user turn of each row of a `{"turns": [...]}` JSONL prompt file."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line)["turns"][0])
            if limit is not None and len(out) >= limit:
                break
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return float("nan") if n == 0 else (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)


def with_ext(stem: Path, ext: str) -> Path:
    """`stem` + `ext`: an --out stem may hold dots (`gil-0.5ms`), which `with_suffix` would cut."""
    return stem.with_name(stem.name + ext)


def save_result(name: str, result: dict[str, Any], out: str | None = None) -> Path:
    """Write JSON with the command line and machine facts next to the figures."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(out) if out else RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        "command": shlex.join(["dspark", *sys.argv[1:]] if Path(sys.argv[0]).name == "dspark" else sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        **result,
    }
    path.write_text(json.dumps(payload, indent=2))
    return path

"""`dspark profile`: measure the SPS curve on this machine, print it, plot it as PNG."""

import logging

from bench.common import RESULTS
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sps_profiler import load_or_profile

logger = logging.getLogger(__name__)


def profile_and_plot(config: EngineConfig, refresh: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = LLMEngine(config)
    key = engine.sps_key
    table = load_or_profile(engine.runner, engine.block_manager, key,
                            config.scheduler.max_num_batched_tokens, refresh=refresh)
    print(f"SPS profile {key}")
    print(f"{'B':>6} {'step ms':>9} {'steps/s':>9} {'tokens/s':>9}")
    for b, t in zip(table.batch_sizes, table.step_seconds):
        print(f"{b:>6} {t * 1e3:>9.1f} {1 / t:>9.1f} {b / t:>9.0f}")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(table.batch_sizes, [1 / t for t in table.step_seconds], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per verify forward (B)")
    ax.set_ylabel("steps per second SPS(B)")
    ax.set_title(key, fontsize=8)
    ax.grid(alpha=0.3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"sps-{key}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")

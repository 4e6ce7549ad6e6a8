"""`dspark draft eval`: offline acceptance of a drafter on prompt files, through the engine.

Every request decodes with speculation at a fixed γ (verify policy "fixed": the scheduler
verifies the whole proposal, so no confidence scheduling). τ = tokens committed per verify round
including the bonus/recovered token, averaged over full rounds (ℓ = γ; rounds that max_tokens
truncates are reported separately). Position-wise conditional acceptance P(k accepted | k-1
accepted) comes from the same rounds. Prompts: the first turn of each line (chat template), the
first `max_prompts` lines of each file; dataset name = file stem.
"""

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from draft.training.data import read_prompts

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EvalConfig:
    draft: str
    prompt_files: tuple[str, ...]
    num_draft_tokens: int = 7
    temperature: float = 1.0
    max_prompts: int = 20
    max_new_tokens: int = 128
    model: str | None = None
    dtype: str | None = None
    batch_size: int = 16
    seed: int = 0
    out: str = "eval.json"
    seeded: bool = False  # request seeds seed + j: the race coupling of engine/sampler.py


def evaluate(cfg: EvalConfig) -> dict:
    from engine import LLM, SamplingParams

    gamma = cfg.num_draft_tokens
    llm = LLM(model=cfg.model, dtype=cfg.dtype, draft=cfg.draft, num_draft_tokens=gamma,
              verify_policy="fixed", max_num_seqs=cfg.batch_size, seed=cfg.seed)
    eng = llm.engine
    job_of: dict[str, int] = {}
    req_rounds: dict[str, list[tuple[int, int]]] = {}  # req_id -> (verify_len, accepted) per round
    execute = eng.runner.execute

    def recording(sched_out):
        out = execute(sched_out)
        for s, new in zip(sched_out.scheduled, out.sampled_token_ids):
            if s.num_draft_tokens and new:
                req_rounds.setdefault(s.req_id, []).append((s.num_draft_tokens, len(new) - 1))
        return out

    eng.runner.execute = recording
    jobs = []
    for file in cfg.prompt_files:
        name = Path(file).stem
        for turns in read_prompts(file)[:cfg.max_prompts]:
            jobs.append((name, llm.encode_chat([{"role": "user", "content": turns[0]}])))
    def params(j: int) -> SamplingParams:
        return SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0,
                              seed=cfg.seed + j if cfg.seeded else None)

    # Finished prompts go to a partial file as they finish, so an interrupted run resumes
    # with the others; it is removed once the result is written.
    partial = Path(cfg.out).with_suffix(".partial.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    finished = _read_partial(partial, cfg)
    bar = tqdm(total=len(jobs), initial=len(finished), desc=f"eval {cfg.draft}", unit="prompt")
    pending = [j for j in range(len(jobs)) if j not in finished]
    try:
        with open(partial, "a") as log:
            if not finished:
                log.write(json.dumps({"config": _fingerprint(cfg)}) + "\n")
            while pending or eng.has_unfinished():
                while pending and len(eng.scheduler.running) + len(eng.scheduler.waiting) < cfg.batch_size:
                    j = pending.pop(0)
                    job_of[eng.add_request(jobs[j][1], params(j))] = j
                for out in eng.step():
                    if out.finished:
                        j = job_of.pop(out.req_id)
                        finished[j] = {"job": j, "rounds": req_rounds.pop(out.req_id, []),
                                       "num_tokens": len(out.token_ids)}
                        log.write(json.dumps(finished[j]) + "\n")
                        log.flush()
                        bar.update(1)
    finally:
        bar.close()
        eng.runner.execute = execute
    rounds: dict[str, list[tuple[int, int]]] = {}
    num_tokens: dict[str, int] = {}
    for j, rec in finished.items():
        name = jobs[j][0]
        rounds.setdefault(name, []).extend(tuple(r) for r in rec["rounds"])
        num_tokens[name] = num_tokens.get(name, 0) + rec["num_tokens"]
    result = {"draft": cfg.draft, "num_draft_tokens": gamma, "temperature": cfg.temperature, "seeded": cfg.seeded,
              "max_prompts": cfg.max_prompts, "max_new_tokens": cfg.max_new_tokens,
              "model": eng.model_name, "dtype": eng.config.dtype, "datasets": {}}
    for name in dict.fromkeys(j[0] for j in jobs):
        result["datasets"][name] = summarise(rounds.get(name, []), gamma)
        result["datasets"][name]["num_prompts"] = sum(1 for j in jobs if j[0] == name)
        result["datasets"][name]["num_tokens"] = num_tokens.get(name, 0)
    taus = [d["tau"] for d in result["datasets"].values()]
    result["macro_tau"] = sum(taus) / len(taus) if taus else float("nan")
    write_outputs(result, cfg.out)
    partial.unlink()
    return result


def _fingerprint(cfg: EvalConfig) -> dict:
    d = asdict(cfg)
    d["prompt_files"] = list(d["prompt_files"])
    d.pop("out")
    return d


def _read_partial(path: Path, cfg: EvalConfig) -> dict[int, dict]:
    """Prompts an interrupted run of the same configuration finished (none for another one)."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, json.JSONDecodeError):
        header = {}
    if header.get("config") != _fingerprint(cfg):
        path.unlink()
        return {}
    done = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the interruption
            continue
        done[rec["job"]] = rec
    return done


def summarise(rounds: list[tuple[int, int]], gamma: int) -> dict:
    full = [a for n, a in rounds if n == gamma]
    tau = (sum(full) / len(full) + 1) if full else float("nan")
    tau_all = (sum(a for _, a in rounds) / len(rounds) + 1) if rounds else float("nan")
    position = []
    for k in range(1, gamma + 1):
        reached = sum(1 for a in full if a >= k - 1)
        position.append(sum(1 for a in full if a >= k) / reached if reached else float("nan"))
    return {"tau": tau, "num_rounds": len(full), "tau_all_rounds": tau_all,
            "num_all_rounds": len(rounds), "position_accept": position}


def write_outputs(result: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    gamma = result["num_draft_tokens"]
    lines = [f"drafter `{result['draft']}`, γ = {gamma}, temperature {result['temperature']}",
             "", "| dataset | τ | rounds | " + " | ".join(f"α{k}" for k in range(1, gamma + 1)) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in range(gamma)) + " |"]
    for name, d in result["datasets"].items():
        lines.append(f"| {name} | {d['tau']:.3f} | {d['num_rounds']} | "
                     + " | ".join(f"{a:.2f}" for a in d["position_accept"]) + " |")
    lines.append(f"| macro | {result['macro_tau']:.3f} | | " + " | ".join("" for _ in range(gamma)) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in result["datasets"].items():
        ax.plot(range(1, gamma + 1), d["position_accept"], marker="o", label=f"{name} (τ={d['tau']:.2f})")
    ax.set_xlabel("draft position k")
    ax.set_ylabel("P(k accepted | k-1 accepted)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['draft']}, γ={gamma}, T={result['temperature']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    plt.close(fig)

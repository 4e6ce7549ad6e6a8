"""The committed form of the training data: token ids only, a few bytes per token.

`pack` turns the generation's `responses.jsonl` into one compressed `.npz`: every sequence's
prompt and response ids back to back (uint16 while the vocabulary fits), offsets, prompt
lengths, splits, temperatures and keys. Any machine rebuilds the target cache from it with one
prefill pass (`dspark draft cache`), with no regeneration.
"""

from pathlib import Path

import numpy as np

from draft.training.data import read_responses

SPLITS = ("train", "heldout")


def pack(data_dir: str | Path, path: str | Path) -> dict:
    """Write the responses of `data_dir` to `path` (.npz); returns a summary."""
    rows = sorted(read_responses(data_dir), key=lambda r: r["key"])
    if not rows:
        raise ValueError(f"no responses in {data_dir}")
    seqs = [r["prompt_ids"] + r["response_ids"] for r in rows]
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64)
    dtype = np.uint16 if flat.max(initial=0) < 2**16 else np.int32
    datasets = sorted({r["dataset"] for r in rows})
    arrays = {
        "token_ids": flat.astype(dtype),
        "offsets": np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64),
        "num_prompt_tokens": np.array([len(r["prompt_ids"]) for r in rows], dtype=np.int32),
        "heldout": np.array([r["split"] == "heldout" for r in rows]),
        "temperature": np.array([r.get("temperature", -1.0) for r in rows], dtype=np.float32),
        "dataset": np.array([datasets.index(r["dataset"]) for r in rows], dtype=np.int16),
        "dataset_names": np.array(datasets),
        "keys": np.array([r["key"] for r in rows]),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    return {"path": str(out), "num_sequences": len(rows),
            "num_response_tokens": int(sum(len(r["response_ids"]) for r in rows)),
            "num_tokens": len(flat), "bytes": out.stat().st_size}


def unpack(path: str | Path) -> list[dict]:
    """The rows of a packed file, as `read_responses` gives them (without `finish_reason`)."""
    z = np.load(path)
    ids, offs = z["token_ids"].astype(np.int64), z["offsets"]
    names = [str(n) for n in z["dataset_names"]]
    rows = []
    for j, key in enumerate(z["keys"]):
        seq = ids[offs[j]:offs[j + 1]].tolist()
        p = int(z["num_prompt_tokens"][j])
        rows.append({"key": str(key), "dataset": names[int(z["dataset"][j])],
                     "split": SPLITS[int(z["heldout"][j])], "temperature": float(z["temperature"][j]),
                     "prompt_ids": seq[:p], "response_ids": seq[p:]})
    return rows

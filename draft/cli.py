"""`dspark draft data|train|calibrate|vocab|eval`: the drafter training pipeline."""

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_TRAIN_PROMPTS = [str(p) for p in sorted((Path(__file__).resolve().parents[2] / "shared" / "data"
                                                 / "prompts" / "train").glob("*.jsonl"))]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dspark draft", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="generate on-policy target responses (token ids)")
    d.add_argument("--prompts", nargs="+", default=DEFAULT_TRAIN_PROMPTS)
    d.add_argument("--out", required=True, help="data directory (responses.jsonl)")
    d.add_argument("--model", default=None)
    d.add_argument("--dtype", default="bfloat16")
    d.add_argument("--max-prompts-per-file", type=int, default=None)
    d.add_argument("--max-prompt-tokens", type=int, default=384)
    d.add_argument("--max-new-tokens", type=int, default=192)
    d.add_argument("--temperatures", default="0,0.7,1.0",
                   help="comma-separated; each conversation draws one")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--heldout-fraction", type=float, default=0.1)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--max-response-tokens", type=int, default=None,
                   help="start no new conversation once this many response tokens exist")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--pack", default=None,
                   help="compact token file: its rows count as done (resume from committed data), "
                        "and it is rewritten with every response at the end")
    d.add_argument("--pack-every-tokens", type=int, default=None,
                   help="also rewrite --pack after every this many new response tokens")

    k = sub.add_parser("pack", help="write the responses as a compact token file (.npz)")
    k.add_argument("--data", required=True, help="data directory (responses.jsonl)")
    k.add_argument("--out", required=True, help=".npz path (committed)")

    b = sub.add_parser("cache", help="build the target cache (one prefill pass) from token ids")
    b.add_argument("--tokens", required=True,
                   help="packed token file (.npz) or a data directory with responses.jsonl")
    b.add_argument("--data", required=True, help="data directory to write (its cache/)")
    b.add_argument("--model", default=None)
    b.add_argument("--dtype", default="bfloat16")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--target-layers", default="1,8,15,22,29", help="layers to cache")

    t = sub.add_parser("train", help="train a drafter on a data directory")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True, help="checkpoint directory")
    t.add_argument("--draft", default="dspark", help="dspark | dflash | eagle3 | mtp")
    t.add_argument("--model", default=None)
    t.add_argument("--config", default=None, help="JSON of drafter config overrides")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-blocks", type=int, default=64, help="anchor blocks per step")
    t.add_argument("--anchors-per-seq", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--dtype", default="bfloat16", help="compute dtype (master weights fp32)")
    t.add_argument("--device", default=None)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    t.add_argument("--stop-step", type=int, default=None,
                   help="stop (and save) at this step; the schedule still spans --steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--loss", default=None,
                   help='JSON of loss weight overrides, e.g. {"ce": 0.1, "tv": 0.9, "kl": 0.0}')
    t.add_argument("--kl-warmup", type=int, default=0, help="steps of forward KL alone first")
    t.add_argument("--schedule-minutes", type=float, default=None,
                   help="the LR schedule spans this much training wall time (over resumed runs), "
                        "then training stops; --steps is ignored")
    t.add_argument("--init-from", default=None,
                   help="start from this checkpoint's weights (shipped name or directory)")
    t.add_argument("--fc-pass-last", action="store_true",
                   help="initialise fc as a pass-through of the deepest target layer")
    t.add_argument("--draft-vocab-size", type=int, default=16384,
                   help="propose among this many most frequent tokens (0: the whole vocabulary)")

    c = sub.add_parser("calibrate", help="Sequential Temperature Scaling on the held-out split")
    c.add_argument("--data", required=True)
    c.add_argument("--draft", required=True, help="checkpoint directory (updated in place)")
    c.add_argument("--model", default=None)
    c.add_argument("--max-blocks", type=int, default=None,
                   help="cap on held-out blocks (default: every held-out response)")
    c.add_argument("--anchors-per-seq", type=int, default=128,
                   help="anchor blocks drawn from each held-out response (at most one per position)")
    c.add_argument("--out", default=None, help="JSON report")
    c.add_argument("--seed", type=int, default=0)

    v = sub.add_parser("vocab", help="restrict a drafter's proposals to the most frequent tokens")
    v.add_argument("--data", required=True, help="data directory (its train responses are counted)")
    v.add_argument("--draft", required=True, help="checkpoint directory (updated in place)")
    v.add_argument("--size", type=int, required=True, help="tokens to keep (0: the whole vocabulary)")

    e = sub.add_parser("eval", help="offline acceptance length on prompt files")
    e.add_argument("--draft", required=True, help="shipped name (dspark, dflash, ...) or directory")
    e.add_argument("--prompts", nargs="+", required=True)
    e.add_argument("--num-draft-tokens", type=int, default=7)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--max-prompts", type=int, default=20)
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--model", default=None)
    e.add_argument("--dtype", default=None)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--seeded", action="store_true",
                   help="give prompt j the request seed --seed + j (seeded requests draft by the target's race)")
    e.add_argument("--out", required=True, help="result JSON (a .md table and .png plot beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "data":
        from draft.training.data import DataConfig, generate

        cfg = DataConfig(tuple(args.prompts), args.out, args.model, args.dtype,
                         args.max_prompts_per_file, args.max_prompt_tokens, args.max_new_tokens,
                         tuple(float(t) for t in args.temperatures.split(",")), args.top_p,
                         args.heldout_fraction, args.batch_size, args.max_response_tokens, args.seed,
                         args.pack, args.pack_every_tokens)
        generate(cfg)
        if args.pack:
            from draft.training.tokens import pack

            print(json.dumps(pack(args.out, args.pack)))
        return 0
    if args.command == "pack":
        from draft.training.tokens import pack

        print(json.dumps(pack(args.data, args.out)))
        return 0
    if args.command == "cache":
        from draft.training.cache import build_cache
        from draft.training.data import read_responses
        from draft.training.tokens import unpack

        src = Path(args.tokens)
        rows = unpack(src) if src.suffix == ".npz" else read_responses(src)
        layers = tuple(int(x) for x in args.target_layers.split(","))
        build_cache(rows, Path(args.data) / "cache", args.model, layers, args.dtype, args.batch_size)
        return 0
    if args.command == "train":
        from draft.training.losses import LossWeights
        from draft.training.trainer import TrainConfig, train

        overrides = json.loads(args.config) if args.config else {}
        cfg = TrainConfig(data_dir=args.data, out_dir=args.out, draft=args.draft, model=args.model,
                          overrides=overrides, steps=args.steps, batch_blocks=args.batch_blocks,
                          anchors_per_seq=args.anchors_per_seq,
                          lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                          clip=args.clip, dtype=args.dtype, device=args.device,
                          save_every=args.save_every, log_every=args.log_every,
                          max_minutes=args.max_minutes, schedule_minutes=args.schedule_minutes,
                          stop_step=args.stop_step, seed=args.seed,
                          loss=LossWeights(**json.loads(args.loss or "{}")), kl_warmup=args.kl_warmup,
                          draft_vocab_size=args.draft_vocab_size, fc_pass_last=args.fc_pass_last,
                          init_from=args.init_from)
        train(cfg)
        return 0
    if args.command == "calibrate":
        from draft.training.calibrate import calibrate_checkpoint

        report = calibrate_checkpoint(args.data, args.draft, args.model, args.max_blocks, args.seed,
                                      args.anchors_per_seq)
        text = json.dumps(report, indent=2)
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return 0
    if args.command == "vocab":
        from draft.training.vocab import set_draft_vocab

        print(json.dumps(set_draft_vocab(args.draft, args.data, args.size)))
        return 0
    if args.command == "eval":
        from draft.training.evaluate import EvalConfig, evaluate

        cfg = EvalConfig(args.draft, tuple(args.prompts), args.num_draft_tokens, args.temperature,
                         args.max_prompts, args.max_new_tokens, args.model, args.dtype,
                         args.batch_size, args.seed, args.out, args.seeded)
        result = evaluate(cfg)
        print(json.dumps({"datasets": {k: v["tau"] for k, v in result["datasets"].items()},
                          "macro_tau": result["macro_tau"]}))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())

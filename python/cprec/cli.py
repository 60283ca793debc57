"""The ``cprec`` command: train, evaluate and size NextItNet / CpRec models."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from . import distributed
from .data import FORMATS, SPLITS, DataError
from .checkpoint import CheckpointError
from .models import CNN_MODELS, INPUTS, MODELS, OUTPUTS, block_dilations_list, parameter_table
from .sharing import SCHEMES
from .schedule import LR_SCHEDULES
from .train import (
    DEFAULT_DROPOUT, DEFAULT_SHARING, OBJECTIVES, RESUMABLE_CHANGES, TrainConfig, evaluate_checkpoint, load_config_data,
    model_config, train,
)


def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _float_list(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _dilations(text: str) -> List[int]:
    try:
        return block_dilations_list(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH", help="interaction log or session file (default: the shipped "
                   "MovieLens ml-latest-small). Formats: MovieLens ratings.csv / ratings.dat / u.data, "
                   "RecBole .inter, CSV/TSV user,item[,rating],timestamp, or sessions (one comma-separated session of "
                   "item ids per line); any of them .gz")
    g.add_argument("--format", default="auto", choices=FORMATS, help="file format (default: auto: MovieLens and RecBole names fix it, otherwise the content "
                   "decides, and a file it cannot tell is an error naming the line and the formats that would read it)")
    g.add_argument("--split", default="leave-one-out", choices=SPLITS,
                   help="leave-one-out: last item test, second last validation; holdout: NextItNet's "
                   "seeded 20%% of sequences for test, 10%% for validation (default: %(default)s)")
    g.add_argument("--max-len", type=int, default=50, help="history length the model sees; longer "
                   "histories are cut into windows (default: %(default)s)")
    g.add_argument("--min-item-count", type=int, default=0, metavar="N", help="k-core filter before the split, "
                   "as RecBole's: drop items with fewer than N interactions and users with fewer than "
                   "--min-user-count, repeated until both hold (default: %(default)s, no filter)")
    g.add_argument("--min-user-count", type=int, default=0, metavar="N", help="see --min-item-count "
                   "(default: %(default)s)")
    g.add_argument("--exclude-seen", action="store_true", help="validation and test rank only the items the "
                   "user has not interacted with before the target (the target always competes), as the published "
                   "SASRec/gSASRec ML-1M protocol filters rated items (default: rank all items)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the batch order (default: %(default)s)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="cprec", choices=MODELS, help="cprec (compressed NextItNet), nextitnet "
                   "(full embedding and softmax), sasrec (self-attention), gru4rec (GRU) or pop (most popular "
                   "items) (default: %(default)s)")
    g.add_argument("--input", "--input-layer", dest="input_layer", choices=INPUTS, default=None,
                   help="input embedding: full, or CpRec's block-wise factorized one (default: blockwise for "
                   "cprec, full otherwise)")
    # --output names the run's directory (train), so the output layer has its own flag.
    g.add_argument("--output-layer", dest="output_layer", choices=OUTPUTS, default=None,
                   help="output layer: full softmax, or the tail-cluster adaptive softmax (default: adaptive "
                   "for cprec, full otherwise)")
    g.add_argument("--dim", type=int, default=64, help="model width d (default: %(default)s)")
    g.add_argument("--dilations", type=_dilations, default=[1, 4, 1, 4], metavar="D,D,...",
                   help="dilation of each residual block; its two convs use d and 2d (default: 1,4,1,4)")
    g.add_argument("--kernel-size", type=int, default=3, help="conv kernel width (default: %(default)s)")
    g.add_argument("--sharing", choices=sorted(SCHEMES), default=None,
                   help=f"layer-wise sharing of the conv layers (default: {DEFAULT_SHARING['cprec']} for "
                   "cprec, none for nextitnet)")
    g.add_argument("--cutoffs", type=_int_list, default=None, metavar="C1,C2,...",
                   help="item-id cutoffs of the frequency blocks (V is appended); default: by --coverage")
    g.add_argument("--coverage", type=_float_list, default=[0.5, 0.8, 0.95], metavar="F,F,...",
                   help="when --cutoffs is not given, block j ends where the most frequent items cover "
                   "this fraction of training interactions (default: 0.5,0.8,0.95)")
    g.add_argument("--div-value", type=float, default=4.0, help="block j has width d / div**j (default: %(default)s)")
    g.add_argument("--head-projection", action="store_true", help="give the head block of the input "
                   "embedding a projection too")
    g.add_argument("--tie-embeddings", action="store_true", help="the output softmax reuses the input "
                   "embedding's item vectors: full input and output layers, or (CpRec) the adaptive softmax's "
                   "head rows and tail tables are the block-wise embedding's tables")
    g.add_argument("--tie-projections", action="store_true", help="with --tie-embeddings on blockwise/adaptive "
                   "ends: each tail cluster's projection is also the input block's (transposed)")
    g.add_argument("--num-layers", type=int, default=2, help="sasrec/gru4rec: attention blocks or GRU layers (default: %(default)s)")
    g.add_argument("--num-heads", type=int, default=1, help="sasrec: attention heads (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=DEFAULT_DROPOUT, help="dropout rate; nextitnet/cprec: on the "
                   "item embeddings and each residual branch (default: %(default)s; 0 turns it off)")
    g.add_argument("--backend", default=None, choices=["auto", "torch", "triton", "cpu", "cuda"],
                   help="kernel backend of the ops (default: $CPREC_BACKEND or auto)")


def _resumable_flags() -> str:
    """The training flags ``--resume`` lets change, from ``RESUMABLE_CHANGES``."""
    shown = sorted(RESUMABLE_CHANGES - {"output", "resume", "overwrite", "progress", "progress_bars"})
    return ", ".join("--" + key.replace("_", "-") for key in shown)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object with the result on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cprec",
        description="Train and evaluate NextItNet and CpRec (compressed NextItNet) sequential recommenders.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model and print its test metrics",
                       description="Train a model (default: CpRec on the shipped ml-latest-small), early-stop on "
                       "validation NDCG@10, and report full-ranking test metrics of the best epoch next to "
                       "the popularity baseline.")
    _add_data_args(t)
    _add_model_args(t)
    g = t.add_argument_group("training")
    g.add_argument("--objective", choices=OBJECTIVES, default="every",
                   help="every: next-item loss at every position of each training window (NextItNet's); "
                   "last: loss at the last position only, over every prefix of each history (what many "
                   "recommender libraries do; about max-len times the compute per epoch) (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=20, help="most epochs to train (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="training windows per batch (default: %(default)s)")
    g.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--patience", type=int, default=5, help="stop after this many epochs without a better "
                   "validation NDCG@10 (default: %(default)s)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="after the warm-up: "
                   "constant lr, or linear/cosine decay to 0 at the last step of --epochs (default: %(default)s)")
    g.add_argument("--warmup-steps", type=float, default=0, metavar="N", help="linear lr warm-up over N steps, or "
                   "over this fraction of all steps when below 1 (default: %(default)s)")
    g.add_argument("--limit-batches", type=int, default=None, help="at most this many batches per epoch (quick runs)")
    g.add_argument("--eval-batch-size", type=int, default=256, help="examples per evaluation batch (default: %(default)s)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    g.add_argument("--output", metavar="DIR", help="write metrics.json, train_log.jsonl and checkpoint.pt here; "
                   "a DIR that already holds a run is refused unless --resume or --overwrite is given")
    g.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt if it exists, "
                   "exactly where it stopped, mid-epoch included (needs --output). The model, data and training "
                   f"flags must be the recorded ones; only {_resumable_flags()} and the output flags may change")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --output DIR: its checkpoint, "
                   "metrics and log are deleted first, and the new run starts a fresh train_log.jsonl")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="also write the checkpoint "
                   "every N training steps, not only after each epoch (needs --output)")
    g.add_argument("--distributed", action="store_true", help="data-parallel training over the processes "
                   "torchrun starts (DDP; gloo on CPU, NCCL on GPU). --batch-size stays the global batch: each "
                   "of N processes takes batch/N rows, so results match one process and --lr needs no change")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: only when stderr is a terminal, so redirected logs "
                   "get the per-epoch lines but no bar frames)")
    _add_output_args(t)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on its data's validation and test split",
                       description="Rebuild the data split and the best model stored in a checkpoint and print "
                       "its validation and test metrics.")
    e.add_argument("checkpoint", help="checkpoint.pt written by 'cprec train --output DIR'")
    e.add_argument("--data", metavar="PATH", help="read the data from here instead of the path stored in the checkpoint")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    e.add_argument("--eval-batch-size", type=int, default=256, help="examples per batch (default: %(default)s)")
    _add_output_args(e)

    p = sub.add_parser("params", help="parameter counts by part and the compression ratio against the full model",
                       description="Count the parameters of a compressed config by part (input embedding, middle, "
                       "output layer) next to its uncompressed baseline with the same d and items: for cprec the "
                       "NextItNet without sharing; for sasrec/gru4rec the same model with full embedding and "
                       "softmax (the compressed side uses --input-layer/--output-layer, by default blockwise/adaptive).")
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--num-items", type=int, default=None, help="vocabulary size V instead of reading --data "
                   "(then --cutoffs is required)")
    _add_output_args(p)

    c = sub.add_parser("compare", help="train a list of configs with several seeds and tabulate parameters "
                       "against accuracy",
                       description="Train every (run, seed) of a JSON study spec that has not finished yet "
                       "(interrupted runs resume from their checkpoint), then write results.md, results.csv and "
                       "ndcg_vs_params.png: parameters by part, compression against the spec's baseline, "
                       "MRR/HR/NDCG@5/10/20 as mean and std over seeds, seconds per epoch. The spec format is in "
                       "docs/accuracy.md and in the docstring of cprec.compare.")
    c.add_argument("spec", help="the study's JSON spec (data, split, seeds, baseline, common options, runs)")
    c.add_argument("--output", metavar="DIR", help="where runs/ and the tables go (default: the spec's folder)")
    c.add_argument("--data", metavar="PATH", help="read the data from here instead of the spec's 'data'")
    c.add_argument("--workers", type=int, default=1, help="runs trained at once, each in its own process "
                   "(default: %(default)s)")
    c.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: CPU cores / "
                   "workers)")
    c.add_argument("--report-only", action="store_true", help="train nothing; write the tables from the runs "
                   "finished so far")
    _add_output_args(c)
    return parser


def _train_config(args) -> TrainConfig:
    return TrainConfig(
        model=args.model, data=args.data, format=args.format, split=args.split, max_len=args.max_len,
        seed=args.seed, d=args.dim, block_dilations=args.dilations, kernel_size=args.kernel_size,
        sharing=args.sharing, cutoffs=args.cutoffs, coverage=args.coverage, div_value=args.div_value,
        head_projection=args.head_projection, tie_embeddings=args.tie_embeddings, tie_projections=args.tie_projections,
        min_item_count=args.min_item_count, min_user_count=args.min_user_count, exclude_seen=args.exclude_seen,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        objective=args.objective, input_layer=args.input_layer, output_layer=args.output_layer, num_layers=args.num_layers,
        num_heads=args.num_heads, dropout=args.dropout, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, patience=args.patience, eval_batch_size=args.eval_batch_size,
        limit_batches=args.limit_batches, device=args.device, backend=args.backend, output=args.output,
        resume=args.resume, checkpoint_every=args.checkpoint_every, distributed=args.distributed,
        progress=not args.quiet, progress_bars=args.progress, overwrite=args.overwrite,
    )


def _metrics_table(title_rows) -> str:
    names = [n for n in title_rows[0][1]]
    lines = ["          " + "".join(f"{n:>10}" for n in names)]
    for title, metrics in title_rows:
        lines.append(f"{title:<10}" + "".join(f"{metrics[n]:>10.4f}" for n in names))
    return "\n".join(lines)


def cmd_train(args) -> dict:
    try:
        result = train(_train_config(args))
        main_process = distributed.is_main()
        # Every rank is done before any tears the group down: a gloo process whose peer
        # closed the connections under it can abort at exit (seen once on a loaded machine).
        distributed.barrier()
    finally:
        distributed.shutdown()
    if not main_process:
        return None
    if not args.json:
        p = result["params"]
        print(f"{result['model']} on {result['dataset']} ({result['split']}): {p['total']:,} parameters "
              f"(input {p['input']:,}, middle {p['middle']:,}, output {p['output']:,}); "
              f"best epoch {result['best_epoch']} of {result['epochs_run']}, {result['train_seconds']} s")
        print(_metrics_table([("test", result["test"]), ("pop", result["baseline_test"])]))
    return result


def cmd_evaluate(args) -> dict:
    result = evaluate_checkpoint(args.checkpoint, args.data, args.device, args.eval_batch_size)
    if not args.json:
        print(f"{result['model']} on {result['dataset']}: {result['params']['total']:,} parameters")
        print(_metrics_table([("valid", result["valid"]), ("test", result["test"])]))
    return result


class _Vocabulary:
    """Stand-in for a dataset when only V is known (``params --num-items``)."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items
        self.counts = None


def cmd_params(args) -> dict:
    cfg = _train_config_for_params(args)
    if args.num_items is not None:
        if args.cutoffs is None:
            raise ValueError("--num-items needs --cutoffs (coverage needs item frequencies from --data)")
        data = _Vocabulary(args.num_items)
    else:
        data = load_config_data(cfg)
    if cfg.model != "pop":
        # The compressed side: factorized ends unless the flags say otherwise.
        cfg.input_layer, cfg.output_layer = cfg.input_layer or "blockwise", cfg.output_layer or "adaptive"
    mcfg = model_config(cfg, data)
    table = parameter_table(mcfg)
    ratio = table["baseline"]["total"] / table["compressed"]["total"]
    result = {"model_config": mcfg, "params": table, "compression_ratio": ratio}
    if not args.json:
        base = "NextItNet" if mcfg["model"] in CNN_MODELS else mcfg["model"]
        print(f"V = {mcfg['num_items']:,}, d = {mcfg['d']}, cutoffs = {mcfg['cutoffs']}, div = {mcfg['div_value']}")
        print(f"baseline: {base} with full embedding and softmax; compressed: {mcfg['model']} with "
              f"{mcfg['input'] if mcfg['model'] != 'nextitnet' else 'blockwise'} input, "
              f"{mcfg['output'] if mcfg['model'] != 'nextitnet' else 'adaptive'} output"
              + (f", sharing {mcfg['sharing']}" if mcfg["model"] in CNN_MODELS else ""))
        print(f"{'part':<8}{'baseline':>12}{'compressed':>12}{'ratio':>8}")
        for part in ("input", "middle", "output", "total"):
            n, c = table["baseline"][part], table["compressed"][part]
            print(f"{part:<8}{n:>12,}{c:>12,}{n / c:>7.2f}x")
    return result


def _train_config_for_params(args) -> TrainConfig:
    for name, value in (("objective", "every"), ("lr_schedule", "constant"), ("warmup_steps", 0), ("epochs", 1), ("batch_size", 1), ("lr", 0.0), ("weight_decay", 0.0), ("patience", 1),
                        ("limit_batches", None), ("eval_batch_size", 1), ("device", "cpu"), ("output", None),
                        ("resume", False), ("quiet", True), ("checkpoint_every", 0), ("distributed", False),
                        ("progress", False), ("overwrite", False)):
        setattr(args, name, value)
    return _train_config(args)


def cmd_compare(args) -> dict:
    from .compare import main_compare

    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError("--workers and --threads must be >= 1")
    return main_compare(args)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "params": cmd_params, "compare": cmd_compare}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # the command's own arguments, for the report's exact command line
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result = COMMANDS[args.command](args)
    except (DataError, CheckpointError, ValueError, TypeError, RuntimeError) as err:
        print(f"cprec {args.command}: error: {err}", file=sys.stderr)
        return 1
    if args.json and result is not None:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training and evaluation of the recommenders.

Loss at every position (padding masked), Adam(W), early stopping on validation
NDCG@10, full-ranking test metrics from the best epoch, a JSONL log and an atomic
checkpoint after every epoch that ``resume`` continues from.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_text_atomic
from .data import Examples, SequenceData, cutoffs_by_coverage, load_dataset
from .metrics import MetricAccumulator, metric_names
from .metrics import exclude_seen as metrics_exclude_seen
from .optim import load_optimizer_state, make_adamw
from .models import PopularityModel, Recommender, build_model, model_dropout, model_ends
from .schedule import check_schedule, make_scheduler

SELECT_METRIC = "NDCG@10"
OBJECTIVES = ("every", "last")
DEFAULT_SHARING = {"cprec": "cross-block"}
# 0.2 for every model. For the CNN models it is the converged ML-1M study's finding
# (docs/accuracy.md): on the embedding and every residual branch it lifted test NDCG@10 by 15%
# (2 seeds) for NextItNet d = 256 and the 8x CpRec, which without it over-fit after 7-12 epochs.
# Model configs recorded before the flag existed carry no dropout key and load as 0
# (models.model_dropout).
DEFAULT_DROPOUT = 0.2


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in checkpoints as a plain dict."""

    model: str = "cprec"
    data: Optional[str] = None  # None: the shipped ml-latest-small
    format: str = "auto"
    split: str = "leave-one-out"
    max_len: int = 50
    min_item_count: int = 0  # k-core filter before the split (0: none)
    min_user_count: int = 0
    seed: int = 0
    d: int = 64
    block_dilations: List[int] = field(default_factory=lambda: [1, 4, 1, 4])
    kernel_size: int = 3
    sharing: Optional[str] = None  # None: cross-block for CpRec, none for NextItNet
    cutoffs: Optional[List[int]] = None  # None: from coverage
    coverage: List[float] = field(default_factory=lambda: [0.5, 0.8, 0.95])
    div_value: float = 4.0
    head_projection: bool = False
    tie_embeddings: bool = False  # the softmax reuses the input embedding (full ends, or blockwise + adaptive)
    tie_projections: bool = False  # tied blockwise + adaptive ends: the tails reuse the input projections too
    input_layer: Optional[str] = None  # full | blockwise; None: the model's default
    output_layer: Optional[str] = None  # full | adaptive; None: the model's default
    num_layers: int = 2  # SASRec / GRU4Rec
    num_heads: int = 1  # SASRec
    dropout: float = DEFAULT_DROPOUT
    objective: str = "every"  # every: loss at every position; last: last position of every prefix
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3
    exclude_seen: bool = False  # rank only items the user has not interacted with (validation and test)
    lr_schedule: str = "constant"  # constant | linear | cosine decay to 0 at the last step of the epoch cap
    warmup_steps: float = 0  # linear warm-up over N steps, or this fraction of all steps when < 1
    eval_batch_size: int = 256
    limit_batches: Optional[int] = None  # cap on batches per epoch (smoke runs)
    device: str = "auto"
    backend: Optional[str] = None
    output: Optional[str] = None
    resume: bool = False
    checkpoint_every: int = 0  # also checkpoint every N training steps (0: once per epoch)
    distributed: bool = False  # under torchrun: DDP over the processes
    progress: bool = True  # False: no bars and no per-epoch lines
    progress_bars: Optional[bool] = None  # None: bars only when stderr is a terminal
    overwrite: bool = False  # replace a run already in ``output`` (else refused without resume)

    def to_dict(self) -> dict:
        return asdict(self)


# TrainConfig keys that may differ when a run resumes: how long it runs, where it runs
# and what it prints. Every other recorded key must match, so new options are guarded
# by default.
RESUMABLE_CHANGES = frozenset({
    "epochs", "patience", "output", "resume", "overwrite", "progress", "progress_bars", "checkpoint_every",
    "eval_batch_size", "device", "distributed",
})
RUN_FILES = ("checkpoint.pt", "metrics.json", "train_log.jsonl")


def config_changes(recorded: dict, cfg: TrainConfig) -> Dict[str, tuple]:
    """{key: (recorded, now)} for the keys of a checkpoint's config that ``cfg`` changes,
    allowlisted keys aside; a key an older checkpoint lacks counts as its default."""
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                for f in fields(TrainConfig)}
    now = cfg.to_dict()
    changes = {}
    for key in sorted(set(recorded) | set(now)):
        if key in RESUMABLE_CHANGES:
            continue
        old, new = recorded.get(key, defaults.get(key)), now.get(key, "(no such option)")
        if old != new:
            changes[key] = (old, new)
    return changes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return device


def resolve_cutoffs(cutoffs: Optional[List[int]], data: SequenceData, coverage: List[float]) -> List[int]:
    """Cutoffs ending at V: given ones (V appended when missing) or by coverage."""
    V = data.num_items
    if cutoffs is None:
        return cutoffs_by_coverage(data.counts, coverage)
    cuts = [int(c) for c in cutoffs]
    if cuts and cuts[-1] != V:
        cuts.append(V)
    if any(c <= 0 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cutoffs must be strictly increasing positive ints below V = {V}, got {cutoffs}")
    return cuts


def load_config_data(cfg: TrainConfig) -> SequenceData:
    """The data set a config trains on (file, format, filter, split, max_len, seed)."""
    return load_dataset(cfg.data, cfg.format, cfg.split, cfg.max_len, cfg.seed, cfg.min_item_count, cfg.min_user_count)


def model_config(cfg: TrainConfig, data: SequenceData) -> dict:
    """The plain dict ``build_model`` takes, with the data-dependent parts resolved."""
    mcfg = {
        "model": cfg.model,
        "num_items": data.num_items,
        "d": cfg.d,
        "block_dilations": list(cfg.block_dilations),
        "kernel_size": cfg.kernel_size,
        "sharing": cfg.sharing or DEFAULT_SHARING.get(cfg.model, "none"),
        "max_len": cfg.max_len,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "dropout": cfg.dropout,
        "input": cfg.input_layer,
        "output": cfg.output_layer,
        "cutoffs": None,
        "div_value": cfg.div_value,
        "head_projection": cfg.head_projection,
        "backend": cfg.backend,
    }
    if cfg.tie_embeddings:  # only when set, so configs (and checkpoints) without it stay as they were
        mcfg["tie_embeddings"] = True
    if cfg.tie_projections:
        mcfg["tie_projections"] = True
    if cfg.model != "pop":
        mcfg["input"], mcfg["output"] = model_ends(mcfg)
        if mcfg["input"] == "blockwise" or mcfg["output"] == "adaptive":
            mcfg["cutoffs"] = resolve_cutoffs(cfg.cutoffs, data, cfg.coverage)
    return mcfg


@torch.no_grad()
def evaluate(model: Recommender, examples: Examples, batch_size: int = 256, device=None,
             exclude_seen: bool = False) -> Dict[str, float]:
    """Full-ranking metrics of the last position's target over all V items, or, with
    ``exclude_seen``, over the items the user has not interacted with before (the
    target always competes; see ``metrics.exclude_seen``).

    Under ``torch.distributed`` each process ranks every N-th example and the metric
    sums are all-reduced, so every process returns the metrics of all examples.
    """
    if exclude_seen and examples.seen is None:
        raise ValueError("exclude_seen needs evaluation examples that keep their seen items")
    device = device or next(iter(model.buffers()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    rank, world = distributed.rank(), distributed.world_size()
    for start in range(rank * batch_size, len(examples), batch_size * world):
        inputs = torch.from_numpy(examples.inputs[start : start + batch_size]).to(device)
        targets = torch.from_numpy(examples.targets[start : start + batch_size, -1]).to(device)
        scores = model.scores(inputs).float()
        if exclude_seen:
            scores = metrics_exclude_seen(scores, examples.seen[start : start + batch_size], targets)
        acc.add(scores, targets)
    model.train(was_training)
    if world > 1:
        names = metric_names(acc.ks)
        *sums, count = distributed.all_reduce_sum([acc.sums.get(n, 0.0) for n in names] + [acc.count], device)
        acc.sums, acc.count = dict(zip(names, sums)), int(count)
    return acc.result()


def _log_line(path: Optional[Path], record: dict) -> None:
    if path is not None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _checkpoint(cfg, mcfg, model, optimizer, state, data, scheduler=None) -> dict:
    return {
        "format": 1,
        "config": cfg.to_dict(),
        "model_config": mcfg,
        "model": model.state_dict(),
        "best_model": state["best_model"],
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "counts": torch.as_tensor(data.counts),
        "progress": {k: v for k, v in state.items() if k != "best_model"},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _prepare_output(cfg: TrainConfig, main_process: bool) -> Optional[Path]:
    """The run directory, refusing to write over a run there unless resuming it or told
    to overwrite it (then its files go first, so nothing of the old run mixes in)."""
    if cfg.output is None:
        for flag, given in (("--resume", cfg.resume), ("--overwrite", cfg.overwrite),
                            ("--checkpoint-every", cfg.checkpoint_every)):
            if given:
                raise ValueError(f"{flag} needs --output (the run's directory)")
        return None
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --output and --overwrite replaces it: pass one of them")
    out_dir = Path(cfg.output)
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if held and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--output {out_dir} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                         "--overwrite to replace it, or another --output")
    if cfg.resume and "metrics.json" in held and "checkpoint.pt" not in held:
        raise ValueError(f"{out_dir} holds a finished run without checkpoint.pt, so --resume cannot continue "
                         "it: --overwrite replaces it")
    if cfg.overwrite and main_process:
        for name in held:
            (out_dir / name).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _refuse_changes(path: Path, ckpt: dict, cfg: TrainConfig, mcfg: dict, data: SequenceData) -> None:
    """Resuming must continue the same run: same model, data and training flags
    (``RESUMABLE_CHANGES`` aside). The error names only what differs."""
    recorded, old = dict(ckpt["config"]), dict(ckpt["model_config"])
    # Runs started when --dropout could be left unset (or before it existed) recorded no
    # rate: the one they trained with is the one their model config builds.
    old["dropout"] = model_dropout(old)
    if recorded.get("dropout") is None:
        recorded["dropout"] = old["dropout"]
    changes = config_changes(recorded, cfg)
    if not changes:  # same flags: the model config can still differ through the data
        changes = {f"model {k}": (old.get(k), mcfg.get(k)) for k in sorted(set(old) | set(mcfg))
                   if old.get(k) != mcfg.get(k)}
    old_counts, counts = ckpt["counts"], torch.as_tensor(data.counts)
    if not changes and not (old_counts.shape == counts.shape and torch.equal(old_counts.to(counts.dtype), counts)):
        changes["data"] = (f"{len(old_counts)} items, {int(old_counts.sum())} training interactions",
                           f"{len(counts)} items, {int(counts.sum())} (other item frequencies)")
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise CheckpointError(f"{path}: cannot resume with other settings ({listed}); resume with the recorded "
                              "ones, or start a new run with another --output or --overwrite")


def _start_log(log_path: Optional[Path], history: List[dict]) -> None:
    """The log starts as the history so far: empty for a new run, the checkpoint's epochs
    for a resumed one (dropping any line logged after the checkpoint was written)."""
    if log_path is not None:
        write_text_atomic(log_path, "".join(json.dumps(record) + "\n" for record in history))


def _session_clock(state: dict) -> Callable[[], float]:
    """Seconds of training over all sessions of a run: the resumed total plus this one's."""
    before, started = state.get("train_seconds", 0.0), time.perf_counter()
    return lambda: before + time.perf_counter() - started


def _show_bars(cfg: TrainConfig) -> bool:
    """Progress bars when asked for, else only on a terminal: bar frames would flood a log."""
    if not cfg.progress:
        return False
    return sys.stderr.isatty() if cfg.progress_bars is None else cfg.progress_bars


def _restore(path: Path, cfg, mcfg, model, optimizer, state, data, say, scheduler=None) -> None:
    ckpt = load_checkpoint(path)
    _refuse_changes(path, ckpt, cfg, mcfg, data)
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        load_optimizer_state(optimizer, ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    state.update(ckpt["progress"])
    state["best_model"] = ckpt["best_model"]
    torch.set_rng_state(ckpt["torch_rng"])
    if ckpt.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    say(f"resumed from {path} at epoch {state['epoch'] + 1}, step {state['step']}")


def train(cfg: TrainConfig, data: Optional[SequenceData] = None, say: Callable[[str], None] = None) -> dict:
    """Train (or, for ``pop``, just fit) ``cfg.model`` and return its metrics.

    -> {"model", "dataset", "params", "model_config", "valid", "test",
        "baseline_test", "epochs_run", "best_epoch", "train_seconds", "history"}
    """
    say = say or (lambda msg: print(msg, file=sys.stderr))
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    check_schedule(cfg.lr_schedule, cfg.warmup_steps)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.distributed:
        distributed.init(device.type)
        device = distributed.local_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    main_process = distributed.is_main()
    out_dir = _prepare_output(cfg, main_process)
    if data is None:
        data = load_config_data(cfg)
        if "filter" in data.stats and main_process:
            f = data.stats["filter"]
            say(f"data after the min count filter (items >= {f['min_item_count']}, users >= {f['min_user_count']}): "
                + ", ".join(f"{v:,} {k}" for k, v in f["after"].items()))
    mcfg = model_config(cfg, data)
    model = build_model(mcfg, data.counts).to(device)
    ckpt_path = out_dir / "checkpoint.pt" if out_dir is not None else None
    log_path = out_dir / "train_log.jsonl" if out_dir is not None and main_process else None
    baseline = evaluate(PopularityModel(data.num_items, data.counts).to(device), data.test, cfg.eval_batch_size, device,
                        cfg.exclude_seen)

    state = {
        "epoch": 0, "step": 0, "global_step": 0, "epoch_loss": [0.0, 0.0], "best_score": -math.inf,
        "best_epoch": -1, "bad_epochs": 0, "history": [], "best_model": None, "train_seconds": 0.0,
    }
    optimizer = scheduler = None
    if model.trainable:
        optimizer = make_adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = make_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, cfg.epochs * _steps_per_epoch(cfg, data))
    if cfg.resume:
        if ckpt_path.is_file():
            _restore(ckpt_path, cfg, mcfg, model, optimizer, state, data, say, scheduler)
        else:
            say(f"no checkpoint at {ckpt_path} yet: starting from scratch")
    _start_log(log_path, state["history"])
    clock = _session_clock(state)
    if model.trainable:
        _fit(cfg, data, model, optimizer, state, device, ckpt_path, log_path, mcfg, say, clock, scheduler)
        if state["best_model"] is not None:
            model.load_state_dict(state["best_model"])
    else:
        state["best_model"] = copy.deepcopy(model.state_dict())
    valid = evaluate(model, data.valid, cfg.eval_batch_size, device, cfg.exclude_seen)
    test = evaluate(model, data.test, cfg.eval_batch_size, device, cfg.exclude_seen)
    result = {
        "model": cfg.model,
        "dataset": data.name,
        "split": data.split,
        "objective": cfg.objective,
        "exclude_seen": cfg.exclude_seen,  # metrics over the items the user had not seen, or over all
        "data_stats": data.stats,
        "model_config": mcfg,
        "params": model.num_parameters(),
        "valid": valid,
        "test": test,
        "baseline_test": baseline,
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"] + 1,
        "train_seconds": round(clock(), 2),
        "history": state["history"],
    }
    if out_dir is not None and main_process:
        if not model.trainable:
            # Trained models' checkpoints are written after every epoch, holding the
            # last weights (to resume from) and the best (to evaluate).
            state["train_seconds"] = clock()
            save_checkpoint(_checkpoint(cfg, mcfg, model, optimizer, state, data), out_dir / "checkpoint.pt")
        _write_json(out_dir / "metrics.json", result)
    return result


def _batches_of(objective: str, data: SequenceData):
    """-> (number of training examples, idx [b] -> (inputs [b, T], targets)): [b, T]
    windows for the every-position objective, or [b] last-position targets of prefixes."""
    if objective == "last":
        return len(data.prefixes), lambda idx: tuple(torch.from_numpy(a) for a in data.prefixes.batch(idx.numpy()))
    inputs_all, targets_all = torch.from_numpy(data.train.inputs), torch.from_numpy(data.train.targets)
    return len(inputs_all), lambda idx: (inputs_all[idx], targets_all[idx])


def _steps_per_epoch(cfg: TrainConfig, data: SequenceData) -> int:
    """Optimizer steps in one epoch (what ``_fit`` batches), for the lr schedule's length."""
    n, _ = _batches_of(cfg.objective, data)  # the example count _fit batches
    steps = max(1, math.ceil(n / cfg.batch_size))
    return steps if cfg.limit_batches is None else max(1, min(steps, cfg.limit_batches))


def _fit(cfg, data, model, optimizer, state, device, ckpt_path, log_path, mcfg, say, clock, scheduler=None) -> None:
    """Epochs of training from ``state`` (which a checkpoint may have restored
    mid-epoch), validating and checkpointing as it goes; ``clock()`` is the run's
    training seconds so far, kept in the checkpoint."""
    n, batch_of = _batches_of(cfg.objective, data)
    trainer = distributed.wrap(model, device)
    world = distributed.world_size()
    main_process = distributed.is_main()

    def save() -> None:
        if ckpt_path is not None and main_process:
            state["train_seconds"] = clock()
            save_checkpoint(_checkpoint(cfg, mcfg, model, optimizer, state, data, scheduler), ckpt_path)

    fail_at = int(os.environ.get("CPREC_FAIL_AT_STEP", "0"))  # crash drill for the restart tests
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"]
        t0 = time.perf_counter()
        # Seeded per epoch (and the same on every process), so a resumed run sees the
        # same batches as an unbroken one; each process takes its slice of each batch.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        batches = order.split(cfg.batch_size)[: cfg.limit_batches]
        if world > 1 and len(batches[-1]) < world:
            batches = batches[:-1]  # too small to give every process a row
        model.train()
        bar = tqdm(
            batches[state["step"] :], desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=state["step"],
            total=len(batches), disable=not (_show_bars(cfg) and main_process), leave=False, file=sys.stderr,
        )
        for idx in bar:
            batch_inputs, batch_targets = batch_of(distributed.my_slice(idx))
            # Counted on the host copy: no device sync just to count tokens.
            count = int((batch_targets != model.pad).sum())
            inputs, targets = batch_inputs.to(device), batch_targets.to(device)
            loss = trainer(inputs, targets)
            total_count, total_loss = distributed.all_reduce_sum([count, loss.item() * count], device)
            if not math.isfinite(total_loss):
                raise FloatingPointError(
                    f"loss is not finite at epoch {epoch + 1}, step {state['step'] + 1}; lower --lr"
                )
            if world > 1:
                # DDP averages gradients over processes: weigh each process's mean by its
                # share of the tokens so the result is the global token mean.
                loss = loss * (count * world / max(total_count, 1.0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            state["step"] += 1
            state["global_step"] += 1
            state["epoch_loss"] = [state["epoch_loss"][0] + total_loss / max(total_count, 1.0), state["epoch_loss"][1] + 1]
            bar.set_postfix(loss=f"{state['epoch_loss'][0] / state['epoch_loss'][1]:.4f}")
            if cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0:
                save()
            if fail_at and state["global_step"] == fail_at and distributed.restart_count() == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        valid = evaluate(model, data.valid, cfg.eval_batch_size, device, cfg.exclude_seen)
        score = valid[SELECT_METRIC]
        improved = score > state["best_score"]
        if improved:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
            state["best_model"] = copy.deepcopy(model.state_dict())
        else:
            state["bad_epochs"] += 1
        total, steps = state["epoch_loss"]
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(steps, 1),
            "valid": valid,
            "seconds": round(time.perf_counter() - t0, 2),
            "improved": improved,
        }
        state["history"].append(record)
        state.update(epoch=epoch + 1, step=0, epoch_loss=[0.0, 0.0])
        _log_line(log_path, record)
        if cfg.progress and main_process:
            say(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}  valid {SELECT_METRIC} {score:.4f}  ({record['seconds']} s)")
        save()


def evaluate_checkpoint(path, data_path=None, device: str = "auto", batch_size: int = 256) -> dict:
    """Rebuild the data and best model of a checkpoint and evaluate valid and test."""
    ckpt = load_checkpoint(path)
    cfg = TrainConfig(**{**ckpt["config"], "resume": False, "output": None})
    if data_path is not None:
        cfg.data = str(data_path)
    data = load_config_data(cfg)
    mcfg = ckpt["model_config"]
    if mcfg["num_items"] != data.num_items:
        raise ValueError(f"the data has {data.num_items} items but the checkpoint's model has {mcfg['num_items']}")
    dev = resolve_device(device)
    model = build_model(mcfg, data.counts).to(dev)
    model.load_state_dict(ckpt["best_model"] if ckpt["best_model"] is not None else ckpt["model"])
    return {
        "model": mcfg["model"],
        "dataset": data.name,
        "params": model.num_parameters(),
        "valid": evaluate(model, data.valid, batch_size, dev, cfg.exclude_seen),
        "test": evaluate(model, data.test, batch_size, dev, cfg.exclude_seen),
    }

"""Interaction data: readers, frequency re-indexing, splits and windows.

Items are re-indexed by descending training frequency (id 0 is the most frequent),
which is what CpRec's block-wise decomposition needs: block cutoffs are then plain
id ranges. Padding is the id ``V`` (one past the last item), kept apart from them.
"""
from __future__ import annotations

import csv
import gzip
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

FORMATS = ("auto", "csv", "tsv", "movielens-dat", "udata", "recbole", "sessions")
SPLITS = ("leave-one-out", "holdout")
SESSION_PADDING = ("-1", "0")

_USER_COLUMNS = ("userid", "user_id", "user", "uid", "session_id")
_ITEM_COLUMNS = ("movieid", "itemid", "item_id", "item", "iid")
_TIME_COLUMNS = ("timestamp", "time", "ts", "datetime")


class DataError(ValueError):
    """A data file that is missing, empty or malformed (the message names file and line)."""


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
def _open_text(path: Path):
    if path.is_dir():
        raise DataError(_directory_hint(path))
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    raw = path.open("rb")
    stream = gzip.open(raw) if path.suffix == ".gz" else raw
    return io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline="")


_DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".dat", ".inter")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")
_LOG_WIDTHS = (3, 4)  # user, item[, rating], timestamp
_SESSIONS_HINT = " (if each line is one session of item ids, pass --format sessions)"
_FORMAT_HINT = ("--format sessions reads each line as one session of item ids; --format csv (or tsv) reads "
                "user,item[,rating],timestamp rows")


def _base_name(path: Path) -> str:
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def _format_by_name(path: Path) -> Optional[str]:
    """The reader that a MovieLens/RecBole file name fixes (their readers check the layout)."""
    name = _base_name(path)
    if name.endswith(".inter"):
        return "recbole"
    if name.endswith(".dat"):
        return "movielens-dat"
    if name == "u.data":
        return "udata"
    return None


def _is_data_name(path: Path) -> bool:
    name = _base_name(path)
    return path.is_file() and not name.upper().startswith("README") and (name.endswith(_DATA_SUFFIXES) or name == "u.data")


def _directory_hint(path: Path) -> str:
    """What ``--data DIR`` should have named: the data files in DIR and its subfolders."""
    found = sorted(str(p.relative_to(path)) for p in (*path.iterdir(), *path.glob("*/*")) if _is_data_name(p))
    if found:
        return f"{path} is a directory; --data wants one file, e.g. one of: {', '.join(found[:12])}"
    return (f"{path} is a directory with no data file in it (looked for *{', *'.join(_DATA_SUFFIXES)}, u.data, "
            "any of them .gz); --data wants one file")


def detect_format(path: Path) -> str:
    """The reader for ``path``: fixed by a MovieLens/RecBole name, otherwise from the content.

    The content decides between an interaction log and sessions (one per line) over every
    line, never by guessing: see ``_sniff``. A file it cannot tell is a DataError naming
    the first line that makes it ambiguous and the ``--format`` values that would read it.
    """
    path = Path(path)
    return _format_by_name(path) or _sniff(path)


def _ambiguous(path: Path, lineno: int, line: str, why: str) -> DataError:
    return DataError(f"{path}:{lineno}: cannot tell the format: {why} (line {lineno}: {line[:200]!r}); "
                     f"{_FORMAT_HINT}")


def _sniff(path: Path) -> str:
    """Interaction log or sessions from the content, streamed over the whole file.

    The first non-empty line sets the separator (``::``, tab, else comma); a header naming
    a user or item column makes an interaction log. Headerless comma-separated lines are
    sessions when their field counts vary or exceed 4 (no log has that), and a log only
    when every line has 3-4 numeric fields and none holds padding ids. Anything else
    (text ids in 3-4 columns, padding in a log-like file, a first line that looks like a
    header this reader does not know, fewer than 3 columns) is ambiguous: an error.
    """
    first = width = varying = text_below = padding = None
    first_is_text, lines = False, 0
    for lineno, line in _lines(path):
        # Quoted fields may hold commas (titles as item ids).
        fields = [x.strip() for x in (next(csv.reader([line])) if '"' in line else line.split(","))]
        is_text = not all(_NUMBER.match(x) for x in fields)
        lines += 1
        if first is None:
            first, width, first_is_text = (lineno, line), len(fields), is_text
            if "::" in line:
                return "movielens-dat"
            if "\t" in line:
                return "tsv"  # sessions are comma-separated: tabs mean a log, whose reader checks it
            if _is_header(fields):
                return "csv"
        else:
            if varying is None and len(fields) != width:
                varying = (lineno, line)
            if text_below is None and is_text:
                text_below = (lineno, line)
        if padding is None and _padded(fields):
            padding = (lineno, line)
    if first is None:
        raise DataError(f"{path}: no interactions or sessions (the file is empty)")
    if first_is_text and text_below is None and lines > 1:
        raise _ambiguous(path, *first, "the first line has text and the others only numbers, like a header, but "
                         f"it names no user or item column (one of {list(_USER_COLUMNS + _ITEM_COLUMNS)})")
    if varying is not None or width > max(_LOG_WIDTHS):
        return "sessions"
    if width < min(_LOG_WIDTHS):
        raise _ambiguous(path, *first, f"every line has {width} field(s): too few for a user,item[,rating],"
                         "timestamp log, and sessions that short hardly train")
    if first_is_text or text_below is not None:
        raise _ambiguous(path, *(first if first_is_text else text_below), f"every line has {width} fields and "
                         "some are not numbers: a log with text ids, or sessions of text items")
    if padding is not None:
        raise _ambiguous(path, *padding, f"every line has {width} numeric fields like a log, but this one holds "
                         "padding ids (-1, or 0s at an end) like a session file")
    return "csv"


def _padded(fields: List[str]) -> bool:
    """A padding id (-1), or two 0s at either end: how fixed-length session files pad."""
    return "-1" in fields or fields[:2] == ["0", "0"] or fields[-2:] == ["0", "0"]


def _column(header: List[str], names: Sequence[str], what: str, path: Path) -> int:
    keys = [h.split(":")[0].strip().lower() for h in header]
    for n in names:
        if n in keys:
            return keys.index(n)
    raise DataError(f"{path}:1: no {what} column in header {header} (looked for {list(names)})")


def _lines(path: Path) -> Iterable[Tuple[int, str]]:
    """(line number, text without the line break) of each non-empty line, streamed."""
    with _open_text(path) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
        except (UnicodeDecodeError, OSError, EOFError) as err:
            raise DataError(f"{path}: unreadable ({err})") from err


def _rows(path: Path, fmt: str) -> Iterable[Tuple[int, List[str]]]:
    """(line number, fields) of each non-empty line."""
    for lineno, line in _lines(path):
        if fmt == "movielens-dat":
            yield lineno, line.split("::")
        elif fmt in ("udata", "recbole", "tsv"):
            yield lineno, line.split("\t")
        elif fmt == "csv":
            yield lineno, next(csv.reader([line]))
        else:
            yield lineno, line.split(",")


def _is_header(fields: List[str]) -> bool:
    return any(f.split(":")[0].strip().lower() in _USER_COLUMNS + _ITEM_COLUMNS for f in fields)


def _is_log_header(fields: List[str]) -> bool:
    """Whether a line, split on commas, is a log header (comma, tab or '::' separated)."""
    line = ",".join(fields)
    return any(_is_header(line.replace(sep, ",").split(",")) for sep in ("\t", "::"))


def read_interactions(path, fmt: str = "auto") -> List[Tuple[str, str, float]]:
    """(user, item, timestamp) rows of an interaction log, in file order.

    Formats: MovieLens ``ratings.csv`` (header userId,movieId,rating,timestamp),
    ``ratings.dat`` (``::``), ``u.data`` (tab), RecBole ``.inter`` (tab, typed header),
    and plain CSV/TSV ``user,item[,rating],timestamp`` with or without a header.
    Any of them may be gzipped (``.gz``).
    """
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "sessions":
        raise DataError(f"{path}: holds sessions (one per line), not an interaction log; read it with --format sessions")
    if fmt not in FORMATS:
        raise DataError(f"{path}: format {fmt!r} is not an interaction log format")
    rows: List[Tuple[str, str, float]] = []
    cols: Optional[Tuple[int, int, int]] = None
    width = None
    for lineno, fields in _rows(path, fmt):
        if cols is None:
            if _is_header(fields):
                cols = (
                    _column(fields, _USER_COLUMNS, "user", path),
                    _column(fields, _ITEM_COLUMNS, "item", path),
                    _column(fields, _TIME_COLUMNS, "timestamp", path),
                )
                width = len(fields)
                continue
            if fmt == "recbole":
                raise DataError(f"{path}:{lineno}: a RecBole .inter file starts with a typed header")
            if len(fields) < 3:
                raise DataError(f"{path}:{lineno}: expected user, item[, rating], timestamp; got {fields}")
            cols, width = (0, 1, len(fields) - 1), len(fields)
        if len(fields) != width:
            raise DataError(f"{path}:{lineno}: expected {width} fields, got {len(fields)}: {fields}{_SESSIONS_HINT}")
        user, item, ts = fields[cols[0]].strip(), fields[cols[1]].strip(), fields[cols[2]].strip()
        if not user or not item:
            raise DataError(f"{path}:{lineno}: empty user or item field")
        try:
            rows.append((user, item, float(ts)))
        except ValueError:
            raise DataError(f"{path}:{lineno}: timestamp {ts!r} is not a number{_SESSIONS_HINT}") from None
    if not rows:
        raise DataError(f"{path}: no interactions (the file is empty or has only a header)")
    return rows


def sequences_from_interactions(rows: List[Tuple[str, str, float]]) -> List[List[str]]:
    """Each user's items ordered by time (file order breaks ties); users by first appearance."""
    by_user: Dict[str, List[Tuple[float, int, str]]] = {}
    for order, (user, item, ts) in enumerate(rows):
        by_user.setdefault(user, []).append((ts, order, item))
    return [[item for _, _, item in sorted(events)] for events in by_user.values()]


def read_sessions(path, padding: Sequence[str] = SESSION_PADDING) -> List[List[str]]:
    """One sequence per line, comma-separated item ids, ``padding`` tokens dropped."""
    path = Path(path)
    sequences = []
    for lineno, fields in _rows(path, "sessions"):
        if not sequences and _is_log_header(fields):
            raise DataError(f"{path}:{lineno}: this is the header of an interaction log ({','.join(fields)[:200]!r}), "
                            "not a session of item ids; read the file with --format auto (or csv, tsv, recbole)")
        items = [f.strip() for f in fields]
        if any(not f for f in items):
            raise DataError(f"{path}:{lineno}: empty item id in {fields}")
        items = [f for f in items if f not in padding]
        if items:
            sequences.append(items)
    if not sequences:
        raise DataError(f"{path}: no sequences (the file is empty or all padding)")
    return sequences


def read_sequences(path, fmt: str = "auto") -> List[List[str]]:
    """Raw item sequences (tokens as in the file) from any supported format."""
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; one of {FORMATS}")
    if fmt == "sessions":
        return read_sessions(path)
    return sequences_from_interactions(read_interactions(path, fmt))


# --------------------------------------------------------------------------------------
# re-indexing, splits, windows
# --------------------------------------------------------------------------------------
@dataclass
class Examples:
    """Model inputs: ``inputs [n, T]`` item ids left-padded with V, ``targets [n, T]``
    (next item at each position, V where there is none). Evaluation examples also keep
    ``seen``: per example, every item id of the user's history before the target (not
    only the last T), for rankings that exclude items already interacted with."""

    inputs: np.ndarray
    targets: np.ndarray
    seen: Optional[List[np.ndarray]] = None

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class Prefixes:
    """Every prefix of every training sequence as one example (the last-position
    objective): predict ``items[g]`` from the up to ``max_len`` items before it in its
    sequence, for each flat position ``g`` in ``positions``. Batches are cut on demand,
    so the [n, max_len] inputs never exist at once."""

    items: np.ndarray  # the training sequences, concatenated
    starts: np.ndarray  # for each flat position, where its sequence starts
    positions: np.ndarray  # flat positions that have at least one item before them
    max_len: int
    pad: int

    def __len__(self) -> int:
        return len(self.positions)

    def batch(self, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """-> (inputs [b, max_len] left-padded with pad, targets [b])."""
        g = self.positions[idx]
        cols = g[:, None] - self.max_len + np.arange(self.max_len)
        inside = cols >= self.starts[g][:, None]
        return np.where(inside, self.items[np.maximum(cols, 0)], self.pad), self.items[g]


def _prefixes(parts: List[np.ndarray], max_len: int, pad: int) -> Prefixes:
    parts = [p for p in parts if len(p)]
    if not parts:
        empty = np.zeros(0, np.int64)
        return Prefixes(empty, empty, empty, max_len, pad)
    items = np.concatenate(parts)
    lengths = np.array([len(p) for p in parts])
    seq_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.flatnonzero(np.arange(len(items)) > seq_start)
    return Prefixes(items, seq_start, positions, max_len, pad)


@dataclass
class SequenceData:
    """A dataset ready for training: re-indexed sequences and their splits."""

    name: str
    num_items: int
    item_tokens: List[str]  # raw token of each item id
    counts: np.ndarray  # training frequency of each item id, descending
    train: Examples
    valid: Examples
    test: Examples
    split: str
    max_len: int
    stats: Dict[str, int] = field(default_factory=dict)
    prefixes: Optional[Prefixes] = None  # the training sequences as prefix examples

    @property
    def pad(self) -> int:
        return self.num_items


def frequency_index(train_sequences: List[List[str]], other: Iterable[List[str]] = ()) -> List[str]:
    """Tokens ordered by descending training frequency (first appearance breaks ties);
    items seen only outside training come last."""
    counts = Counter(t for s in train_sequences for t in s)
    first: Dict[str, int] = {}
    for s in (*train_sequences, *other):
        for t in s:
            first.setdefault(t, len(first))
    return sorted(first, key=lambda t: (-counts.get(t, 0), first[t]))


def _windows(seq: np.ndarray, max_len: int, pad: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Cut a sequence into windows of max_len predictions, newest first, each target
    predicted once; short windows are left-padded."""
    out = []
    end = len(seq)
    while end >= 2:
        w = seq[max(0, end - max_len - 1) : end]
        x = np.full(max_len, pad, dtype=np.int64)
        y = np.full(max_len, pad, dtype=np.int64)
        x[max_len - len(w) + 1 :] = w[:-1]
        y[max_len - len(w) + 1 :] = w[1:]
        out.append((x, y))
        end -= max_len
    return out


def _history(seq: np.ndarray, max_len: int, pad: int) -> Tuple[np.ndarray, np.ndarray]:
    """Input for predicting the item after ``seq``: its last max_len items, left-padded."""
    x = np.full(max_len, pad, dtype=np.int64)
    tail = seq[-max_len:]
    x[max_len - len(tail) :] = tail
    return x


def _stack(pairs, max_len: int) -> Examples:
    """Examples from (input, target) pairs, or (input, target, seen) for evaluation."""
    if not pairs:
        return Examples(np.zeros((0, max_len), np.int64), np.zeros((0, max_len), np.int64))
    seen = [p[2] for p in pairs] if len(pairs[0]) > 2 else None
    return Examples(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), seen)


def _eval_example(history: np.ndarray, target: int, max_len: int, pad: int):
    """Evaluation example: only the last position has a target; the whole history is
    kept as its seen items."""
    y = np.full(max_len, pad, dtype=np.int64)
    y[-1] = target
    return _history(history, max_len, pad), y, history


def build_dataset(
    sequences: List[List[str]],
    name: str = "data",
    split: str = "leave-one-out",
    max_len: int = 50,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    valid_fraction: float = 0.1,
) -> SequenceData:
    """Re-index, split and window raw sequences.

    leave-one-out: per user, the last item is the test target, the second last the
    validation target, the rest trains (users with fewer than 3 items only train).
    holdout (NextItNet's protocol): a seeded ``holdout_fraction`` of whole sequences
    is the test set and ``valid_fraction`` the validation set; each is scored on
    its last item; the remaining sequences train.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        raise DataError(f"{name}: no sequence has 2 or more items")
    if split == "leave-one-out":
        train_parts = [s[:-2] if len(s) >= 3 else s for s in sequences]
        held = [(s[:-2], s[-2], s[:-1], s[-1]) for s in sequences if len(s) >= 3]
    else:
        order = np.random.default_rng(seed).permutation(len(sequences))
        n_test = int(round(holdout_fraction * len(sequences)))
        n_valid = int(round(valid_fraction * len(sequences)))
        test_ids, valid_ids = order[:n_test], order[n_test : n_test + n_valid]
        train_parts = [sequences[i] for i in order[n_test + n_valid :]]
        held = None
    tokens = frequency_index(train_parts, sequences)
    index = {t: i for i, t in enumerate(tokens)}
    V = len(tokens)

    def ids(s: List[str]) -> np.ndarray:
        return np.fromiter((index[t] for t in s), dtype=np.int64, count=len(s))

    train_ids = [ids(s) for s in train_parts]
    counts = np.bincount(np.concatenate(train_ids), minlength=V)
    train = _stack([w for s in train_ids for w in _windows(s, max_len, V)], max_len)
    if split == "leave-one-out":
        valid = _stack([_eval_example(ids(h), index[t], max_len, V) for h, t, _, _ in held], max_len)
        test = _stack([_eval_example(ids(h), index[t], max_len, V) for _, _, h, t in held], max_len)
    else:
        def last_item(which):
            return _stack([_eval_example(ids(sequences[i][:-1]), index[sequences[i][-1]], max_len, V) for i in which], max_len)

        valid, test = last_item(valid_ids), last_item(test_ids)
    if len(train) == 0 or len(test) == 0 or len(valid) == 0:
        raise DataError(
            f"{name}: split {split!r} left an empty part (train {len(train)}, valid {len(valid)}, "
            f"test {len(test)} examples); use more data"
        )
    stats = {
        "sequences": len(sequences),
        "interactions": int(sum(len(s) for s in sequences)),
        "items": V,
        "train_examples": len(train),
        "valid_examples": len(valid),
        "test_examples": len(test),
    }
    return SequenceData(name, V, tokens, counts, train, valid, test, split, max_len, stats,
                        _prefixes(train_ids, max_len, V))


def log_counts(sequences: List[List[str]]) -> Dict[str, int]:
    """{"users", "items", "interactions"} of a log (a user is a sequence)."""
    return {"users": len(sequences), "items": len({t for s in sequences for t in s}),
            "interactions": sum(len(s) for s in sequences)}


def filter_min_counts(sequences: List[List[str]], min_item_count: int = 0, min_user_count: int = 0) -> List[List[str]]:
    """RecBole's k-core filter (``_filter_by_inter_num``): drop every interaction with an
    item that has fewer than ``min_item_count`` interactions and every user (sequence)
    with fewer than ``min_user_count``, counting repeats, and repeat until nothing
    changes, so every remaining item and user meets its bound. Order is kept; users
    left with no items are dropped."""
    if min_item_count < 0 or min_user_count < 0:
        raise ValueError(f"min counts must be >= 0, got {min_item_count}, {min_user_count}")
    while True:
        counts = Counter(t for s in sequences for t in s)
        kept = [[t for t in s if counts[t] >= min_item_count] for s in sequences]
        kept = [s for s in kept if s and len(s) >= min_user_count]
        if sum(map(len, kept)) == sum(map(len, sequences)) and len(kept) == len(sequences):
            return kept
        sequences = kept


def load_dataset(
    path=None, fmt: str = "auto", split: str = "leave-one-out", max_len: int = 50, seed: int = 0,
    min_item_count: int = 0, min_user_count: int = 0,
) -> SequenceData:
    """Read, (optionally k-core filter,) re-index and split a data file (default: the
    shipped ml-latest-small). With a filter, ``stats["filter"]`` holds the bounds and
    the log's users, items and interactions before and after it."""
    from .datasets import DEFAULT_DATASET

    path = Path(path) if path is not None else DEFAULT_DATASET
    name = path.name.split(".")[0] if path != DEFAULT_DATASET else "ml-latest-small"
    sequences = read_sequences(path, fmt)
    if not (min_item_count or min_user_count):
        return build_dataset(sequences, name=name, split=split, max_len=max_len, seed=seed)
    raw = log_counts(sequences)
    sequences = filter_min_counts(sequences, min_item_count, min_user_count)
    data = build_dataset(sequences, name=name, split=split, max_len=max_len, seed=seed)
    data.stats["filter"] = {"min_item_count": min_item_count, "min_user_count": min_user_count,
                            "before": raw, "after": log_counts(sequences)}
    return data


def cutoffs_by_coverage(counts: np.ndarray, coverage: Sequence[float] = (0.5, 0.8, 0.95)) -> List[int]:
    """Block cutoffs [c1, ..., V] so the head holds the items that make up ``coverage[0]``
    of training interactions, the next block up to ``coverage[1]``, and so on.

    counts must be in descending order (item ids by frequency); cutoffs that would
    collide are dropped, so fewer blocks may come back on tiny vocabularies.
    """
    V = len(counts)
    total = counts.sum()
    cum = np.cumsum(counts) / max(total, 1)
    cuts = []
    for c in coverage:
        cut = int(np.searchsorted(cum, c) + 1)
        if (not cuts or cut > cuts[-1]) and cut < V:
            cuts.append(cut)
    return cuts + [V]

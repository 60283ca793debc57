"""Readers, re-indexing, windows and splits; bad files name the file and line."""
import gzip
import os

import numpy as np
import pytest

from cprec.data import (
    DataError,
    build_dataset,
    cutoffs_by_coverage,
    filter_min_counts,
    load_dataset,
    log_counts,
    read_interactions,
    read_sequences,
    read_sessions,
)

FORMAT_HINT = "--format sessions.*--format csv"


def _write(path, text, gz=False):
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_movielens_csv_and_time_order(tmp_path):
    p = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,30\n1,11,3.0,10\n2,10,5.0,5\n1,12,1.0,20\n")
    assert read_interactions(p) == [("1", "10", 30.0), ("1", "11", 10.0), ("2", "10", 5.0), ("1", "12", 20.0)]
    assert read_sequences(p) == [["11", "12", "10"], ["10"]]


def test_dat_udata_recbole_and_gzip(tmp_path):
    dat = _write(tmp_path / "ratings.dat", "1::5::3::100\n1::6::4::50\n")
    assert read_sequences(dat) == [["6", "5"]]
    udata = _write(tmp_path / "u.data", "7\t8\t3\t2\n7\t9\t3\t1\n")
    assert read_sequences(udata) == [["9", "8"]]
    inter = _write(
        tmp_path / "x.inter.gz",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\tA Movie (1999)\t5\t2\nu1\tB\t3\t1\n",
        gz=True,
    )
    assert read_sequences(inter) == [["B", "A Movie (1999)"]]
    plain = _write(tmp_path / "log.tsv", "u\ti\t3\nu\tj\t1\n")
    assert read_sequences(plain) == [["j", "i"]]


def test_sessions_drop_padding(tmp_path):
    p = _write(tmp_path / "seq.txt", "-1,-1,5,6,7\n0,3,4\n-1,-1\n")
    assert read_sessions(p) == [["5", "6", "7"], ["3", "4"]]


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3\n", r"ratings.csv:3: expected 4 fields"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,soon\n", r"ratings.csv:2: timestamp 'soon'"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n", "no interactions"),
        ("ratings.csv", "", "no interactions"),
        ("x.inter", "1\t2\t3\t4\n", r"x.inter:1: a RecBole .inter file starts with a typed header"),
        ("x.inter", "user_id:token\trating:float\ttimestamp:float\n", r"x.inter:1: no item column"),
        ("seq.txt", "1,2\n3,,4\n", r"seq.txt:2: empty item id"),
        ("seq.txt", "\n\n", "the file is empty"),
        ("seq.txt", "-1,-1\n-1,-1,-1\n", "no sequences"),
        ("ratings.dat", "1::2\n", r"ratings.dat:1: expected user, item"),
        ("data.bin", "x", "cannot tell the format"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, message):
    p = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=message):
        read_sequences(p)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_sequences(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="unreadable"):
        read_sequences(bad)
    assert issubclass(DataError, ValueError)


def test_frequency_reindex_windows_and_leave_one_out():
    seqs = [list("abcab"), list("cbaddd"), list("xy")]
    data = build_dataset(seqs, split="leave-one-out", max_len=3)
    # training parts: "abc", "cbad", "xy" (short sequences train whole)
    # a, b, c appear twice in training, d, x, y once; first appearance breaks ties
    assert data.item_tokens == ["a", "b", "c", "d", "x", "y"]
    assert list(data.counts) == sorted(data.counts, reverse=True)
    V = data.num_items
    assert V == 6 and data.pad == 6
    idx = {t: i for i, t in enumerate(data.item_tokens)}
    # the test example of user 0 predicts its last item from the 3 before it
    np.testing.assert_array_equal(data.test.inputs[0], [idx["b"], idx["c"], idx["a"]])
    np.testing.assert_array_equal(data.test.targets[0], [V, V, idx["b"]])
    np.testing.assert_array_equal(data.valid.inputs[0], [idx["a"], idx["b"], idx["c"]])
    assert data.valid.targets[0][-1] == idx["a"]
    np.testing.assert_array_equal(data.valid.inputs[1], [idx["b"], idx["a"], idx["d"]])
    # windows: every training target exactly once, padding where there is none
    n_targets = sum(len(s[:-2] if len(s) >= 3 else s) - 1 for s in seqs)
    assert int((data.train.targets != V).sum()) == n_targets
    assert ((data.train.inputs == V) <= (data.train.targets == V)).all()


def test_long_sequence_windows_cover_each_target_once():
    seq = [str(i) for i in range(23)]
    data = build_dataset([seq], split="leave-one-out", max_len=5)
    targets = data.train.targets[data.train.targets != data.pad]
    assert sorted(data.item_tokens[t] for t in targets) == sorted(seq[1:21])


def test_holdout_split_is_seeded():
    seqs = [[f"i{(u * 7 + k) % 13}" for k in range(6)] for u in range(50)]
    a = build_dataset(seqs, split="holdout", max_len=4, seed=1)
    b = build_dataset(seqs, split="holdout", max_len=4, seed=1)
    c = build_dataset(seqs, split="holdout", max_len=4, seed=2)
    assert len(a.test) == 10 and len(a.valid) == 5
    np.testing.assert_array_equal(a.test.inputs, b.test.inputs)
    assert not np.array_equal(a.test.inputs, c.test.inputs)


def test_cutoffs_by_coverage():
    counts = np.array([50, 30, 10, 5, 3, 1, 1])
    assert cutoffs_by_coverage(counts, (0.5, 0.8, 0.95)) == [1, 2, 4, 7]
    assert cutoffs_by_coverage(np.array([5, 5]), (0.5, 0.8, 0.95))[-1] == 2


def test_shipped_dataset_loads():
    data = load_dataset()
    assert data.name == "ml-latest-small" and data.num_items == 9724
    assert data.stats["sequences"] == 610 and data.stats["interactions"] == 100836


def test_shared_datasets_load(shared_data):
    ml100k = read_sequences(os.path.join(shared_data, "ml-100k", "ml-100k.inter"))
    assert len(ml100k) == 943 and sum(map(len, ml100k)) == 100000
    seq20 = read_sequences(os.path.join(shared_data, "ml-1m-seq20", "ratings_seq20_order.txt"))
    assert len(seq20) == 25242 and max(map(len, seq20)) == 20
    ml1m = read_sequences(os.path.join(shared_data, "ml-1m", "ml-1m.inter.gz"))
    assert len(ml1m) == 6040 and sum(map(len, ml1m)) == 1000209


# --- format detection never guesses (issue 17) -------------------------------------------
def test_session_csv_of_varying_length_reads_as_sessions(tmp_path):
    """A NextItNet-style .csv (one session per line) was read as user,item,...,timestamp."""
    p = _write(tmp_path / "sessions.csv", "5,6,7,8\n1,2\n9,5,6\n")
    assert read_sequences(p) == [["5", "6", "7", "8"], ["1", "2"], ["9", "5", "6"]]
    text = _write(tmp_path / "items.csv", "apple,pear,fig\nfig,kiwi\n")
    assert read_sequences(text) == [["apple", "pear", "fig"], ["fig", "kiwi"]]


def test_fixed_length_padded_sessions_read_as_sessions(tmp_path):
    p = _write(tmp_path / "seq.csv", "-1,-1,-1,4,5,6\n1,2,3,4,5,6\n")
    assert read_sequences(p) == [["4", "5", "6"], ["1", "2", "3", "4", "5", "6"]]


@pytest.mark.parametrize(
    "text,line",
    [
        ("a,b,c\nd,e,f\n", 1),  # 3 text fields: a log with text ids, or sessions of text items
        ("u1,i1,5\nu1,i2,1\n", 1),
        ("1,2,3,4\n-1,-1,5,6\n", 2),  # log-like widths with session padding
        ("customer,product,when\n1,2,3\n", 1),  # a header this reader does not know
        ("1,2\n3,4\n", 1),  # too few columns for a log
    ],
)
def test_ambiguous_files_are_errors_naming_line_and_formats(tmp_path, text, line):
    p = _write(tmp_path / "data.csv", text)
    with pytest.raises(DataError, match=rf"data.csv:{line}: cannot tell the format.*{FORMAT_HINT}"):
        read_sequences(p)


def test_interaction_logs_still_detected(tmp_path):
    plain = _write(tmp_path / "log.csv", "1,10,4.0,30\n1,11,3.0,10\n2,10,5.0,5\n")
    assert read_sequences(plain) == [["11", "10"], ["10"]]
    tabs = _write(tmp_path / "log.txt", "1\t10\t30\n1\t11\t10\n")
    assert read_sequences(tabs) == [["11", "10"]]


def test_text_timestamps_name_the_sessions_format(tmp_path):
    p = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,soon\n")
    with pytest.raises(DataError, match="not a number.*--format sessions"):
        read_sequences(p)


@pytest.mark.parametrize(
    "name,header",
    [("ratings.csv", "userId,movieId,rating,timestamp"), ("x.inter", "user_id:token\titem_id:token\ttimestamp:float")],
)
def test_sessions_refuses_a_log_header(tmp_path, name, header):
    p = _write(tmp_path / name, header + "\n1,2,3,4\n")
    with pytest.raises(DataError, match=f"{name}:1: this is the header of an interaction log"):
        read_sequences(p, "sessions")


def test_data_directory_names_the_files_in_it(tmp_path):
    _write(tmp_path / "ratings.csv", "1,2,3\n")
    _write(tmp_path / "README.txt", "licence")
    with pytest.raises(DataError, match="is a directory; --data wants one file, e.g. one of: ratings.csv$"):
        read_sequences(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="directory with no data file"):
        read_sequences(tmp_path / "empty")


def test_min_count_filter_iterates_to_its_fixed_point():
    # One pass would keep u1 = [a, b] and u2 = [a, c]; dropping u3 takes b below 2,
    # which drops u1, then a, then u2, then c: only u4 is left.
    seqs = [["a", "b"], ["a", "c"], ["b"], ["d", "c", "d"]]
    assert filter_min_counts(seqs, 2, 2) == [["d", "d"]]
    assert filter_min_counts(seqs, 0, 0) == seqs
    assert filter_min_counts(seqs, 2, 0) == seqs
    assert filter_min_counts(seqs, 0, 2) == [["a", "b"], ["a", "c"], ["d", "c", "d"]]
    rng = np.random.default_rng(3)
    for _ in range(20):
        log = [[f"i{int(v)}" for v in rng.zipf(1.6, rng.integers(1, 12)) % 40] for _ in range(30)]
        kept = filter_min_counts(log, 3, 4)
        counts = log_counts(kept)
        items = {t for s in kept for t in s}
        assert all(sum(s.count(t) for s in kept) >= 3 for t in items) and all(len(s) >= 4 for s in kept)
        assert filter_min_counts(kept, 3, 4) == kept and counts["interactions"] == sum(map(len, kept))
    with pytest.raises(ValueError):
        filter_min_counts(seqs, -1, 0)


def test_load_dataset_reports_the_filter(tmp_path):
    rows = "".join(f"{u}\t{i}\t{t}\n" for t, (u, i) in enumerate(
        [(u, i) for u, items in ((1, "ababa"), (2, "abzaba"), (3, "abbab")) for i in items]))
    p = _write(tmp_path / "log.inter", "user_id:token\titem_id:token\ttimestamp:float\n" + rows)
    data = load_dataset(p, min_item_count=2, min_user_count=3)
    assert data.stats["filter"] == {"min_item_count": 2, "min_user_count": 3,
                                    "before": {"users": 3, "items": 3, "interactions": 16},
                                    "after": {"users": 3, "items": 2, "interactions": 15}}
    assert data.num_items == 2 and "filter" not in load_dataset(p).stats


def test_ml_1m_filtered_as_published(shared_data):
    ml1m = read_sequences(os.path.join(shared_data, "ml-1m", "ml-1m.inter.gz"))
    assert log_counts(filter_min_counts(ml1m, 5, 0)) == {"users": 6040, "items": 3416, "interactions": 999611}

"""The Criteo text-format reader (ttrec.criteo) on small files written here, against hand-computed
DLRM preprocessing (empty -> 0, negative integers -> 0, log(x + 1), hex values, per-feature
dictionaries in order of first occurrence, or value % table size)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from ttrec.criteo import NUM_CAT_FEATURES, CriteoReader, feature_batches


def line(label, ints, cats) -> str:
    fields = ([] if label is None else [label]) + [str(x) for x in ints] + list(cats)
    return "\t".join(fields) + "\n"


CATS_A = ["68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "7e0ccccf", "de7995b8", "1f89b562",
          "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef", "8ba8b39a", "891b62e7",
          "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d", "07b5194c", "", "3a171ecb", "c5c50484",
          "e8b83407", "9727dd16"]
CATS_B = ["68fd1e64"] + ["0"] * 24 + ["ffffffff"]


def write(tmp_path, lines, name="day_0"):
    path = tmp_path / name
    path.write_text("".join(lines))
    return path


def test_kaggle_train_width_with_label_empty_fields_and_dictionaries(tmp_path):
    ints_a = [1, "", -3, 7, 0, 5, 1, 2, 3, 4, 5, 6, 7]
    path = write(tmp_path, [line("0", ints_a, CATS_A), line("1", [""] * 13, CATS_B), line("", [2] * 13, CATS_A)])
    batches = list(CriteoReader(path, 1000, batch_size=2, mapping="dictionary"))
    assert [b.labels.tolist() for b in batches] == [[0.0, 1.0], [0.0]]  # an empty label reads as 0
    dense = torch.cat([b.dense for b in batches])
    expect_a = [math.log(max(0 if x == "" else x, 0) + 1) for x in ints_a]
    assert torch.allclose(dense[0], torch.tensor(expect_a, dtype=torch.float32))
    assert torch.equal(dense[1], torch.zeros(13))
    sparse = torch.cat([b.sparse for b in batches])
    assert sparse.shape == (3, NUM_CAT_FEATURES) and sparse.dtype == torch.int64
    # per feature, ids in order of first occurrence: sample 0 gets 0 everywhere ...
    assert sparse[0].tolist() == [0] * 26
    # ... sample 1 repeats feature 0's value (id 0) and is new elsewhere, except feature 21, whose
    # empty field in sample 0 read as 0, the same value as sample 1's "0"
    expect_b = [0] + [1] * 20 + [0] + [1] * 4
    assert sparse[1].tolist() == expect_b
    assert sparse[2].tolist() == [0] * 26
    assert torch.equal(batches[0].feature(3).indices, sparse[:2, 3])
    assert torch.equal(batches[0].feature(3).offsets, torch.arange(2))


def test_hash_mapping_is_value_modulo_table_size(tmp_path):
    path = write(tmp_path, [line("1", [0] * 13, CATS_A), line("0", [0] * 13, CATS_B)])
    sizes = [97 + j for j in range(26)]
    (b,) = list(CriteoReader(path, sizes, batch_size=10, mapping="hash"))
    for j in range(26):
        for i, cats in enumerate((CATS_A, CATS_B)):
            assert int(b.sparse[i, j]) == int(cats[j] or "0", 16) % sizes[j]


def test_test_width_without_label(tmp_path):
    path = write(tmp_path, [line(None, [3] * 13, CATS_A), line(None, [4] * 13, CATS_B)], "test.txt")
    reader = CriteoReader(path, 50, batch_size=8)
    (b,) = list(reader)
    assert reader.has_label is False
    assert bool(torch.isnan(b.labels).all()) and b.dense.shape == (2, 13)
    assert torch.allclose(b.dense[1], torch.full((13,), math.log(5.0)))


@pytest.mark.parametrize("bad,needle", [
    (line("1", [0] * 13, CATS_A[:-1]), "got 39 tab-separated fields; expected 40"),  # width changes
    (line("2", [0] * 13, CATS_A), "label: got '2'"),
    (line("1", ["x"] + [0] * 12, CATS_A), "integer feature 0: got 'x'"),
    (line("1", [0] * 13, ["zz"] + CATS_A[1:]), "categorical feature 0: got 'zz'"),
    ("\n", "empty line"),
])
def test_malformed_lines_fail_with_file_and_line_number(tmp_path, bad, needle):
    path = write(tmp_path, [line("0", [0] * 13, CATS_A), line("1", [1] * 13, CATS_B), bad])
    with pytest.raises(ValueError, match=rf"day_0:3: .*{needle}" if needle != "empty line" else "day_0:3: empty line"):
        list(CriteoReader(path, 1000, batch_size=1))


def test_first_line_of_unknown_width_is_rejected(tmp_path):
    path = write(tmp_path, ["1\t2\t3\n"])
    with pytest.raises(ValueError, match=r"day_0:1: got 3 tab-separated fields; expected 40 .* or 39"):
        list(CriteoReader(path, 10))


def test_dictionary_larger_than_the_table_is_an_error(tmp_path):
    path = write(tmp_path, [line("0", [0] * 13, CATS_A), line("0", [0] * 13, CATS_B)])
    with pytest.raises(ValueError, match=r"day_0:2: categorical feature 1 has more than num_embeddings=1"):
        list(CriteoReader(path, 1, mapping="dictionary"))


def test_feature_batches_repeat_with_stable_ids(tmp_path):
    path = write(tmp_path, [line("0", [0] * 13, CATS_A if i % 2 else CATS_B) for i in range(5)])
    stream = feature_batches(path, 25, 1000, batch_size=2, mapping="dictionary")
    got = [next(stream) for _ in range(5)]  # full batches of 2 bags: the stream runs on into the next pass
    assert [b.indices.tolist() for b in got] == [[0, 1], [0, 1], [0, 0], [1, 0], [1, 0]]  # the same ids again
    assert all(b.offsets.tolist() == [0, 1] for b in got)
    once = feature_batches(path, 25, 1000, batch_size=2, mapping="dictionary", repeat=False)
    assert [b.indices.tolist() for b in once] == [[0, 1], [0, 1], [0]]  # one pass: its last batch as it comes
    short = feature_batches(path, 25, 1000, batch_size=12, mapping="dictionary")  # a file shorter than a batch
    assert [next(short).num_bags for _ in range(3)] == [12, 12, 12]  # timed points saw 5 bags, recorded as 12
    with pytest.raises(ValueError, match="feature: got 26"):
        next(feature_batches(path, 26, 10))


@pytest.mark.parametrize("kwargs,needle", [
    ({"mapping": "murmur"}, "mapping: got 'murmur'"),
    ({"num_embeddings": [10] * 25}, "got 25 table sizes"),
    ({"num_embeddings": 0}, "num_embeddings: got 0"),
    ({"batch_size": 0}, "batch_size: got 0"),
])
def test_reader_arguments_are_checked(tmp_path, kwargs, needle):
    path = write(tmp_path, [line("0", [0] * 13, CATS_A)])
    with pytest.raises(ValueError, match=needle):
        CriteoReader(path, **{"num_embeddings": 10, **kwargs})
    with pytest.raises(FileNotFoundError, match="not a file"):
        CriteoReader(tmp_path / "missing", 10)


@pytest.mark.parametrize("j,value", [(20, "0x1f"), (20, " 1f"), (20, "1_f"), (20, "+1f"), (20, "-1f"),
                                     (3, " 7 "), (3, "1_000"), (3, "+7"), (3, "0x7")])
def test_strict_parsing_rejects_text_python_int_would_accept(tmp_path, j, value):
    fields = ["1"] + [str(i) for i in range(13)] + ["%08x" % i for i in range(26)]
    fields[j] = value
    path = write(tmp_path, ["\t".join(fields) + "\n"])
    kind = "categorical feature 6" if j >= 14 else "integer feature 2"
    with pytest.raises(ValueError, match=rf"day_0:1: {kind}: got '{re.escape(value)}'"):
        list(CriteoReader(path, 1000))


def test_strict_parsing_still_accepts_criteo_text(tmp_path):
    path = write(tmp_path, [line("1", [-2, 0, 7] + [""] * 10, ["ABCdef01"] + CATS_A[1:])])
    (b,) = list(CriteoReader(path, 2**40))
    assert int(b.sparse[0, 0]) == 0xabcdef01 and b.dense[0, 0] == 0 and b.dense[0, 2] == pytest.approx(math.log(8))


def _clicks_line(label, cat0):
    return line(label, [1] * 13, [cat0] + ["%x" % (7 + i) for i in range(25)])


def test_held_out_file_shares_the_training_dictionaries(tmp_path):
    from ttrec.synthetic_clicks import CriteoClicks

    train = write(tmp_path, [_clicks_line(y, c) for y, c in (("1", "aaaa"), ("0", "bbbb"), ("1", "cccc"),
                                                            ("0", "aaaa"))], "train.txt")
    # "dddd" is never in training: the next free row (3), a row training never updates
    held_out = write(tmp_path, [_clicks_line("1", "cccc"), _clicks_line("0", "bbbb"), _clicks_line("0", "dddd")],
                     "eval.txt")
    c = CriteoClicks(train, [100] * 26, batch_size=4, eval_samples=3, eval_path=held_out, mapping="dictionary")
    assert c.next_batch().sparse[:, 0].tolist() == [0, 1, 2, 0]
    assert c.eval_set.sparse[:, 0].tolist() == [2, 1, 3]
    # a table too small for the training and held-out values together: the usual dictionary error
    with pytest.raises(ValueError, match=r"eval.txt:3: categorical feature 0 has more than num_embeddings=3"):
        CriteoClicks(train, [3] + [100] * 25, batch_size=4, eval_samples=3, eval_path=held_out, mapping="dictionary")
    # hash mapping: the same value, the same row, in both files
    h = CriteoClicks(train, [100] * 26, batch_size=4, eval_samples=3, eval_path=held_out)
    assert h.eval_set.sparse[:, 0].tolist() == [0xcccc % 100, 0xbbbb % 100, 0xdddd % 100]


@pytest.mark.parametrize("which", ["train", "eval"])
def test_unlabelled_training_or_held_out_file_is_a_clear_error(tmp_path, which):
    from ttrec.synthetic_clicks import CriteoClicks

    labelled = write(tmp_path, [line("1", [1] * 13, CATS_A)] * 4, "train.txt")
    unlabelled = write(tmp_path, [line(None, [1] * 13, CATS_A)] * 4, "test.txt")
    train, held_out = (unlabelled, labelled) if which == "train" else (labelled, unlabelled)
    for mapping in ("hash", "dictionary"):
        with pytest.raises(ValueError, match=r"test.txt:1: no labels: 39 fields, a labelled Criteo file has 40"):
            CriteoClicks(train, [100] * 26, batch_size=2, eval_samples=2, eval_path=held_out, mapping=mapping)
    with pytest.raises(ValueError, match=r"test.txt:1: no labels: 39 fields"):
        CriteoClicks(unlabelled, [100] * 26, batch_size=2, eval_samples=2)


def test_criteo_training_batches_are_full_after_the_held_out_part(tmp_path):
    from ttrec.synthetic_clicks import CriteoClicks

    path = write(tmp_path, [_clicks_line(str(i % 2), "%x" % (100 + i)) for i in range(10)])
    c = CriteoClicks(path, [1000] * 26, batch_size=4, eval_samples=3)
    batches = [c.next_batch() for _ in range(7)]
    assert [len(b) for b in batches] == [4] * 7
    # the training samples (lines 3..9) in file order, pass after pass, remainders carried over
    got = [int(r) - 100 for b in batches for r in b.sparse[:, 0].tolist()]
    assert got == [3, 4, 5, 6, 7, 8, 9] * 4

"""Prepared-CSV dataset, splits, class weights and seeded loaders."""

import numpy as np
import pandas as pd
import pytest
import torch

from raug.data.loaders import (
    CLASS_NAMES,
    TEST_CSV,
    TRAIN_CSV,
    DataError,
    EpochSampler,
    IsicDataset,
    build_data,
    class_weights,
    load_splits,
    make_loader,
    read_parsed_csv,
    set_loader_epoch,
)
from raug.data.transforms import eval_transform
from raug.testing import BlobDataset, write_prepared_dataset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared_dataset(tmp_path_factory.mktemp("prep"), n_train=80, n_test=16, size=36)


def config(base, **kw):
    return {"_base_path": str(base), "_folder": 2, "_img_size": 32, "_batch_size": 8,
            "_num_workers": 0, "_weights": "frequency", "_use_wce": True, "seed": 7, **kw}


def test_splits_follow_the_folder_column(prepared):
    train, val, test = load_splits(prepared, folder=2)
    full = pd.read_csv(prepared / TRAIN_CSV)
    assert set(val["image"]) == set(full.loc[full["folder"] == 2, "image"])
    assert set(train["image"]) == set(full.loc[full["folder"] != 2, "image"])
    assert len(test) == 16
    with pytest.raises(DataError, match=r"ISIC2019_parsed_train.csv.*_folder=9.*\[1, 2, 3, 4, 5\]"):
        load_splits(prepared, folder=9)


def test_dataset_items(prepared):
    frame = read_parsed_csv(prepared / TRAIN_CSV, require_folder=True)
    ds = IsicDataset(frame, prepared / "train" / "imgs", eval_transform(32), prepared / TRAIN_CSV)
    item = ds[3]
    row = frame.iloc[3]
    assert item["id"] == row["image"]
    assert item["label"].dtype == torch.int64
    assert item["label"].item() == row["diagnostic_number"] == CLASS_NAMES.index(row["diagnostic"])
    assert item["image"].shape == (3, 32, 32)
    assert item["image"].dtype == torch.float32
    assert item["meta"].shape == (11,)
    assert item["meta"][0].item() == pytest.approx(row["age_approx"] / 100)
    np.testing.assert_array_equal(item["meta"][1:].numpy(), row.iloc[2:12].to_numpy(np.float32))


def test_bad_ids_missing_images_and_csvs_are_named(prepared, tmp_path):
    frame = read_parsed_csv(prepared / TRAIN_CSV, require_folder=True)
    for bad in ("../../etc/passwd", "a/b", "..", ""):
        evil = frame.head(2).copy()
        evil.loc[1, "image"] = bad
        with pytest.raises(DataError, match="not a plain file name"):
            IsicDataset(evil, prepared / "train" / "imgs", eval_transform(32), "x.csv")
    ghost = frame.head(1).copy()
    ghost.loc[0, "image"] = "ISIC_missing"
    ds = IsicDataset(ghost, prepared / "train" / "imgs", eval_transform(32), "x.csv")
    with pytest.raises(DataError, match=r"image not found: .*ISIC_missing\.jpg"):
        ds[0]
    with pytest.raises(DataError, match=r"prepared CSV not found: .*nowhere\.csv"):
        read_parsed_csv(tmp_path / "nowhere.csv")
    broken = frame.copy()
    broken.loc[4, "diagnostic"] = "NV"  # disagrees with diagnostic_number
    path = tmp_path / "broken.csv"
    broken.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"broken\.csv: row 6 has diagnostic='NV'"):
        read_parsed_csv(path)


def test_class_weights_rule():
    labels = [0] * 6 + [1] * 3 + [2]
    w = class_weights(labels, num_classes=3)
    assert w.tolist() == pytest.approx([round(10 / 6, 3), round(10 / 3, 3), 10.0])
    assert class_weights(labels, 3, use_wce=False) is None
    with pytest.raises(ValueError, match="no training images"):
        class_weights([0, 0, 1], num_classes=3)


def test_build_data_counts_weights_on_training_folds(prepared):
    data = build_data(config(prepared), CPU)
    counts = np.bincount(data.train.labels, minlength=8)
    expected = [round(len(data.train) / n, 3) for n in counts]
    assert data.class_weight.tolist() == pytest.approx(expected)
    assert data.class_names == list(CLASS_NAMES)
    assert len(data.train) + len(data.val) == 80
    assert not data.train_loader.pin_memory


def batches(loader, epoch):
    set_loader_epoch(loader, epoch)
    return [(b["id"], b["image"]) for b in loader]


def test_training_batches_depend_only_on_seed_and_epoch(prepared):
    data0 = build_data(config(prepared), CPU)
    data2 = build_data(config(prepared, _num_workers=2), CPU)
    e1_w0, e2_w0 = batches(data0.train_loader, 1), batches(data0.train_loader, 2)
    e1_w2 = batches(data2.train_loader, 1)
    assert [ids for ids, _ in e1_w0] != [ids for ids, _ in e2_w0]
    # same epoch: same order and bit-identical augmented images, whatever the workers
    for (ids_a, img_a), (ids_b, img_b) in zip(e1_w0, e1_w2):
        assert ids_a == ids_b
        assert torch.equal(img_a, img_b)
    again = batches(data0.train_loader, 1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(e1_w0, again))


def test_sampler_and_drop_last_rule():
    s = EpochSampler(10, seed=3)
    s.set_epoch(4)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10))
    assert list(s) == first
    ds = list(range(17))
    assert make_loader(ds, 8, 0, CPU, 0, train=True).drop_last  # 17 % 8 == 1: no batch of 1
    assert not make_loader(list(range(18)), 8, 0, CPU, 0, train=True).drop_last
    assert not make_loader(ds, 8, 0, CPU, 0, train=False).drop_last


def test_only_training_loaders_keep_their_workers():
    ds = BlobDataset(16)
    assert make_loader(ds, 8, 2, CPU, 0, train=True).persistent_workers is True
    assert make_loader(ds, 8, 2, CPU, 0, train=False).persistent_workers is False
    assert make_loader(ds, 8, 0, CPU, 0, train=True).persistent_workers is False  # no workers
    # an evaluation pass starts its workers and nothing of them is kept after it
    val = make_loader(ds, 8, 2, CPU, 0, train=False)
    assert [i for b in val for i in b["id"]] == ds.ids
    assert val._iterator is None
    # the training workers wait for the next epoch
    train = make_loader(ds, 8, 2, CPU, 0, train=True)
    assert sorted(i for b in train for i in b["id"]) == sorted(ds.ids)
    assert train._iterator is not None
    assert train._iterator._workers_status == [True, True]


def test_test_csv_without_folder_column(prepared):
    frame = read_parsed_csv(prepared / TEST_CSV)
    assert "folder" not in frame.columns
    with pytest.raises(DataError, match=r"missing column\(s\) \['folder'\]"):
        read_parsed_csv(prepared / TEST_CSV, require_folder=True)


def test_reads_the_prepared_synthetic_data(prepared_isic):
    """The reader accepts what run_preprocess.sh writes (shared session fixture)."""
    train, val, _ = load_splits(prepared_isic, folder=2)
    full = pd.read_csv(prepared_isic / TRAIN_CSV)
    assert len(train) + len(val) == len(full)
    assert sorted(full["folder"].unique()) == [1, 2, 3, 4, 5]
    data = build_data(config(prepared_isic, _img_size=64), CPU)
    item = data.test[0]
    row = pd.read_csv(prepared_isic / TEST_CSV, dtype={"image": str}).iloc[0]
    assert item["id"] == row["image"]
    assert item["label"].item() == row["diagnostic_number"]
    assert item["meta"][0].item() == pytest.approx(row["age_approx"] / 100)
    assert item["image"].shape == (3, 64, 64)
    assert (data.class_weight > 0).all()

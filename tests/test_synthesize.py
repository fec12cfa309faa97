"""Synthetic ISIC 2019: official format and quirks, class frequencies, determinism."""

import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raug.isic2019 import DataError, class_counts, synthesize
from raug.isic2019.schema import (
    GT_CLASSES,
    IMAGES_DIR,
    LABELS_CSV,
    METADATA_CSV,
    REAL_CLASS_COUNTS,
    SITE_VALUES,
)
from raug.isic2019.synthesize import RenderJob, make_plan, render_jpeg

REPO = Path(__file__).resolve().parents[1]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_raw(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    kw = {"dtype": str, "keep_default_na": False}
    return pd.read_csv(root / LABELS_CSV, **kw), pd.read_csv(root / METADATA_CSV, **kw)


def test_class_counts_follow_the_real_frequencies_with_a_floor():
    assert class_counts(25331) == REAL_CLASS_COUNTS
    assert class_counts(200) == {"NV": 88, "MEL": 31, "BCC": 23, "BKL": 18,
                                 "AK": 10, "SCC": 10, "VASC": 10, "DF": 10}
    assert class_counts(80) == dict.fromkeys(REAL_CLASS_COUNTS, 10)
    for n in (1, 7, 79, 80, 81, 333, 600, 1000, 5000):
        counts = class_counts(n)
        assert sum(counts.values()) == n
        if n >= 80:
            assert min(counts.values()) >= 10
    assert min(class_counts(79).values()) == 9  # floor n // 8 below 80 images
    big = class_counts(5000)
    assert big["NV"] > big["MEL"] > big["BCC"] > big["BKL"] > big["AK"] > big["SCC"] > big["VASC"]


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path):
    a = synthesize(tmp_path / "a", num_images=40, image_size=32, seed=5, workers=1, progress=False)
    b = synthesize(tmp_path / "b", num_images=40, image_size=32, seed=5, workers=2, progress=False)
    c = synthesize(tmp_path / "c", num_images=40, image_size=32, seed=6, workers=1, progress=False)
    ha, hb, hc = tree_hashes(a), tree_hashes(b), tree_hashes(c)
    assert len(ha) == 40 + 3  # images, two CSVs, marker
    assert ha == hb
    assert ha[LABELS_CSV] != hc[LABELS_CSV]
    common = [k for k in ha if k.startswith(IMAGES_DIR) and k in hc]
    assert all(ha[k] != hc[k] for k in common)


def test_official_headers_one_hot_labels_and_unk_column(synthetic_raw):
    text = (synthetic_raw / LABELS_CSV).read_text().splitlines()
    assert text[0] == "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
    assert (synthetic_raw / METADATA_CSV).read_text().splitlines()[0] == \
        "image,age_approx,anatom_site_general,lesion_id,sex"
    labels, meta = read_raw(synthetic_raw)
    cells = labels[[*GT_CLASSES, "UNK"]]
    assert set(np.unique(cells.to_numpy())) == {"0.0", "1.0"}
    assert (cells[list(GT_CLASSES)] == "1.0").sum(axis=1).eq(1).all()
    assert (cells["UNK"] == "0.0").all()
    counts = (cells[list(GT_CLASSES)] == "1.0").sum().to_dict()
    assert counts == {c: class_counts(200)[c] for c in GT_CLASSES}
    assert list(labels["image"]) == sorted(labels["image"]) == list(meta["image"])
    assert labels["image"].is_unique


def test_metadata_values_and_quirks(synthetic_raw):
    labels, meta = read_raw(synthetic_raw)
    age = meta["age_approx"]
    assert age.str.fullmatch(r"(\d+\.0)?").all()
    assert (pd.to_numeric(age[age != ""]) % 5 == 0).all()
    assert set(meta["sex"]) <= {"male", "female", ""}
    assert set(meta["anatom_site_general"]) <= {*SITE_VALUES, ""}
    assert meta["lesion_id"].str.fullmatch(r"((BCN|HAM)_\d{7})?").all()
    # The quirks of the official files are all present.
    for col in ("age_approx", "sex", "anatom_site_general", "lesion_id"):
        assert (meta[col] == "").any(), col
    assert labels["image"].str.endswith("_downsampled").any()
    assert labels["image"].str.fullmatch(r"ISIC_\d{7}(_downsampled)?").all()
    per_lesion = meta.loc[meta["lesion_id"] != "", "lesion_id"].value_counts()
    assert (per_lesion >= 2).sum() >= 5
    # Images of one lesion share its class and metadata.
    merged = meta.assign(cls=labels[list(GT_CLASSES)].eq("1.0").idxmax(axis=1))
    shared = merged[merged["lesion_id"] != ""].groupby("lesion_id")
    assert (shared["cls"].nunique() == 1).all()
    assert (shared["sex"].agg(lambda s: s[s != ""].nunique()) <= 1).all()


def test_images_exist_with_varied_sizes_and_a_dark_vignette(synthetic_raw):
    labels, _ = read_raw(synthetic_raw)
    sizes, corner, centre = set(), [], []
    for image in labels["image"]:
        with Image.open(synthetic_raw / IMAGES_DIR / f"{image}.jpg") as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
            sizes.add(im.size)
            a = np.asarray(im, np.float32).mean(axis=2)
        corner.append(a[:3, :3].mean())
        h, w = a.shape
        centre.append(a[h // 3: 2 * h // 3, w // 3: 2 * w // 3].mean())
    assert {min(s) for s in sizes} == {96, 120, 144}
    assert any(w < h for w, h in sizes)  # some portrait
    assert any(w > h for w, h in sizes)
    assert len(sizes) >= 6
    assert np.mean(corner) < 0.5 * np.mean(centre)


def centre_colour(cls: str, n: int = 12) -> np.ndarray:
    """Mean RGB of the central third over ``n`` fresh 64 px renders of ``cls``."""
    out = []
    for i in range(n):
        data = render_jpeg(RenderJob(seed=3, index=i, lesion_key=i, cls=cls, width=64, height=64))
        a = np.asarray(Image.open(io.BytesIO(data)), np.float32)
        out.append(a[22:42, 22:42].reshape(-1, 3).mean(axis=0))
    return np.mean(out, axis=0)


def test_lesion_colour_depends_on_the_class():
    colours = {c: centre_colour(c) for c in GT_CLASSES}
    luminance = {c: rgb.mean() for c, rgb in colours.items()}
    redness = {c: rgb[0] - rgb[1] for c, rgb in colours.items()}
    assert min(luminance, key=luminance.get) == "MEL"
    assert max(redness, key=redness.get) == "VASC"
    assert luminance["NV"] < luminance["BKL"]
    assert colours["BCC"][2] > colours["NV"][2] + 20  # pink/blue-grey vs brown


def test_plan_gives_lesions_one_look_across_images():
    rows = make_plan(120, 48, seed=9)
    by_lesion = {}
    for r in rows:
        if r["lesion_id"]:
            by_lesion.setdefault(r["lesion_id"], set()).add(r["lesion_key"])
    assert all(len(keys) == 1 for keys in by_lesion.values())
    unlinked = [r["lesion_key"] for r in rows if not r["lesion_id"]]
    assert len(set(unlinked)) == len(unlinked)


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / LABELS_CSV).write_text("image,MEL\nISIC_1,1.0\n")
    before = tree_hashes(tmp_path)
    with pytest.raises(DataError, match=re.escape(LABELS_CSV)):
        synthesize(tmp_path, num_images=10, image_size=32, seed=0, progress=False)
    assert tree_hashes(tmp_path) == before


def test_rerun_with_fewer_images_removes_stale_ones(tmp_path):
    synthesize(tmp_path, num_images=30, image_size=32, seed=1, progress=False)
    synthesize(tmp_path, num_images=12, image_size=32, seed=1, progress=False)
    labels, _ = read_raw(tmp_path)
    on_disk = sorted(p.stem for p in (tmp_path / IMAGES_DIR).iterdir())
    assert len(on_disk) == 12
    assert on_disk == sorted(labels["image"])


def test_rerun_removes_temporaries_of_a_killed_run(tmp_path):
    synthesize(tmp_path, num_images=12, image_size=32, seed=1, progress=False)
    labels, _ = read_raw(tmp_path)

    def temp(folder: Path, name: str) -> Path:  # named as raug.files.atomic names them
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        return Path(path)

    stale = [temp(tmp_path / IMAGES_DIR, f"{labels['image'][0]}.jpg"),
             temp(tmp_path / IMAGES_DIR, "ISIC_7777777.jpg"), temp(tmp_path, LABELS_CSV),
             temp(tmp_path, "ISIC_2019_Training_synthetic.json")]
    kept = [temp(tmp_path, "notes.txt"), temp(tmp_path / IMAGES_DIR, "notes.txt")]
    before = tree_hashes(tmp_path)
    synthesize(tmp_path, num_images=12, image_size=32, seed=1, progress=False)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert tree_hashes(tmp_path) == {k: v for k, v in before.items() if tmp_path / k not in stale}


def test_cli_writes_the_dataset_and_rejects_bad_arguments(tmp_path):
    cli = [sys.executable, str(REPO / "data" / "ISIC2019" / "synthesize.py")]
    ok = subprocess.run([*cli, "--root", "ds", "--num-images", "9", "--image-size", "24",
                         "--seed", "3", "--no-progress", "--workers", "1"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "ds" / IMAGES_DIR).glob("*.jpg"))) == 9
    bad = subprocess.run([*cli, "--root", "bad", "--num-images", "0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --num-images must be >= 1")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_classes_are_learnable_but_not_trivially():
    """Logistic regression on 16x16 px: well above chance (0.125), well below perfect."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    def pixels(data: bytes) -> np.ndarray:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        return np.asarray(im.resize((16, 16), Image.Resampling.BILINEAR), np.float32).ravel() / 255

    rows = make_plan(600, 64, seed=11)
    x_train = np.stack([pixels(render_jpeg(RenderJob(11, i, r["lesion_key"], r["cls"],
                                                     r["width"], r["height"])))
                        for i, r in enumerate(rows)])
    y_train = np.array([r["cls"] for r in rows])
    x_test, y_test = [], []
    for c, cls in enumerate(GT_CLASSES):  # balanced test set of unseen lesions
        for j in range(30):
            job = RenderJob(99, 1000 * c + j, 10**6 + 1000 * c + j, cls, 64 + 22 * (j % 2), 64)
            x_test.append(pixels(render_jpeg(job)))
            y_test.append(cls)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    clf = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")
    clf.fit((x_train - mean) / std, y_train)
    bacc = balanced_accuracy_score(y_test, clf.predict((np.stack(x_test) - mean) / std))
    assert 0.6 < bacc < 0.95


def test_min_per_class_raises_the_floor_and_keeps_proportions_above_it():
    counts = class_counts(1000, min_per_class=40)
    assert sum(counts.values()) == 1000
    assert min(counts.values()) == 40
    assert counts["NV"] > counts["MEL"] > counts["BCC"] > counts["BKL"] > 40
    assert class_counts(1000) == class_counts(1000, min_per_class=10)
    assert min(class_counts(200, min_per_class=40).values()) == 25  # n // 8 when N is too small

"""Input-pipeline benchmark: training images/s from the prepared cache vs the original JPEGs.

Data: a synthetic ISIC 2019 set with full-size originals (shorter side >= ``image_size``,
1024 px by default, i.e. 1024x1365 and larger), prepared by the project's own commands::

    python data/ISIC2019/synthesize.py --root DIR --num-images 64 --image-size 1024 --seed 0
    bash run_preprocess.sh --root DIR --size 288

* ours: ``raug.data.loaders.IsicDataset`` on ``DIR/train/imgs`` (the cache, shorter side 288 px)
  with the training transform, through ``raug.data.loaders.make_loader``;
* baseline: ``baselines/seed_loader.SeedOriginalsDataset`` on the originals
  ``DIR/ISIC_2019_Training_Input`` (PIL decode of the full-size JPEG, as the seed did),
  the same transform, the same ``make_loader`` settings (batch size, workers, sampler);
* control (not part of the ratio): the toolkit's dataset pointed at the originals, which
  separates the effect of the cache from that of the decoder.

One timed pass iterates the whole training table once; passes alternate (ours,
baseline, ...) after a warm-up pass of each (worker start, page cache).

Usage::

    python benchmarks/bench_loader.py [--data-dir DIR] [--num-images 64] [--image-size 1024]
        [--size 288] [--img-size 224] [--batch 32] [--workers N] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from raug.data.loaders import TRAIN_CSV, IsicDataset, make_loader, read_parsed_csv
from raug.data.transforms import train_transform

if __package__:
    from . import common
    from .baselines.seed_loader import SeedOriginalsDataset
else:
    import common
    from baselines.seed_loader import SeedOriginalsDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / "results" / "benchmarks" / "loader_data"
ORIGINALS = "ISIC_2019_Training_Input"
SYNTHESIZE = REPO_ROOT / "data" / "ISIC2019" / "synthesize.py"
PREPROCESS = REPO_ROOT / "run_preprocess.sh"


def default_workers() -> int:
    """Loader workers as the config default ``_num_workers``: ``min(8, CPUs)``."""
    return min(8, os.cpu_count() or 1)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}"
        )


def prepare_data(
    data_dir: str | Path, num_images: int = 64, image_size: int = 1024, size: int = 288,
    seed: int = 0,
) -> Path:
    """Synthesize originals and prepare the cache under ``data_dir`` (reused when present).

    A folder is reused only if its ``benchmark.json`` records the same arguments and the
    prepared training CSV exists; otherwise both commands run again.

    Returns:
        ``data_dir`` as a ``Path``.

    Raises:
        RuntimeError: a command failed (its stderr is in the message).
        FileNotFoundError: the project's commands are missing.
    """
    data_dir = Path(data_dir)
    wanted = {"num_images": num_images, "image_size": image_size, "size": size, "seed": seed}
    stamp = data_dir / "benchmark.json"
    ready = stamp.is_file() and (data_dir / TRAIN_CSV).is_file()
    if ready and json.loads(stamp.read_text()) == wanted:
        return data_dir
    for tool in (SYNTHESIZE, PREPROCESS):
        if not tool.is_file():
            raise FileNotFoundError(f"loader benchmark needs {tool} (not found)")
    data_dir.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, str(SYNTHESIZE), "--root", str(data_dir), "--num-images",
          str(num_images), "--image-size", str(image_size), "--seed", str(seed)], "synthesize")
    _run(["bash", str(PREPROCESS), "--root", str(data_dir), "--size", str(size)], "run_preprocess")
    common.write_json(stamp, wanted)
    return data_dir


def image_sizes(folder: Path, ids: list[str]) -> dict[str, Any]:
    """Median width/height and the smallest shorter side of the listed JPEGs (header only)."""
    dims = []
    for i in ids:
        with Image.open(folder / f"{i}.jpg") as img:
            dims.append(img.size)
    arr = np.array(dims)
    return {
        "median_wh": [int(np.median(arr[:, 0])), int(np.median(arr[:, 1]))],
        "min_short_side": int(arr.min(axis=1).min()),
        "max_short_side": int(arr.min(axis=1).max()),
    }


def _pass(loader) -> int:
    """Iterate the loader once; returns the number of images delivered."""
    n = 0
    for batch in loader:
        n += int(batch["image"].shape[0])
    return n


def _toolkit_dataset(data_dir: Path, table, img_size: int, seed: int) -> IsicDataset:
    """The training dataset on the prepared cache as runs ship it (``build_data``: uint8,
    normalised later on the device)."""
    return IsicDataset(table, data_dir / "train" / "imgs",
                       train_transform(img_size, seed=seed, normalise=False), data_dir / TRAIN_CSV)


def _timed_passes(loader, repeats: int) -> list[float]:
    """Seconds of ``repeats`` passes after one untimed pass (worker start, page cache)."""
    _pass(loader)
    runs = []
    for _ in tqdm(range(repeats), desc="loader passes", leave=False):
        start = time.perf_counter()
        _pass(loader)
        runs.append(time.perf_counter() - start)
    return runs


def worker_scan(
    data_dir: str | Path, workers: Sequence[int], img_size: int = 224, batch: int = 8,
    repeats: int = 3, device: str = "cpu", seed: int = 2021,
) -> list[dict[str, Any]]:
    """Training images/s of the toolkit's pipeline alone for each number of loader workers.

    What a GPU run needs to know: how many workers keep up with the step. ``batch`` is
    small so that every worker gets batches in one pass of the (small) benchmark set;
    ``images_per_s_per_worker`` divides by the workers (by 1 for the main process).
    """
    data_dir = Path(data_dir)
    table = read_parsed_csv(data_dir / TRAIN_CSV, require_folder=True)
    dataset = _toolkit_dataset(data_dir, table, img_size, seed)
    rows = []
    for count in workers:
        loader = make_loader(dataset, batch, count, torch.device(device), seed, train=True)
        runs = _timed_passes(loader, repeats)
        rate = len(table) / common.median(runs)
        rows.append({"workers": int(count), "images_per_s": rate,
                     "images_per_s_per_worker": rate / max(int(count), 1),
                     "runs": runs, "batch": batch, "img_size": img_size})
    return rows


def bench_loader(
    data_dir: str | Path, img_size: int = 224, batch: int = 32, workers: int | None = None,
    repeats: int = 5, warmup: int = 1, device: str = "cpu", seed: int = 2021,
    control: bool = True,
) -> dict[str, Any]:
    """Training images/s of the toolkit's pipeline vs the seed's, as a result entry.

    ``ours``/``baseline`` are seconds per image (median pass time / images per pass);
    ``ratio`` = baseline / ours = our images/s over the baseline's.
    """
    data_dir = Path(data_dir)
    workers = default_workers() if workers is None else workers
    table = read_parsed_csv(data_dir / TRAIN_CSV, require_folder=True)
    ids = [str(i) for i in table["image"]]
    labels = table["diagnostic_number"].tolist()
    dev = torch.device(device)
    ours_ds = _toolkit_dataset(data_dir, table, img_size, seed)
    seed_ds = SeedOriginalsDataset(data_dir / ORIGINALS, ids, labels,
                                   train_transform(img_size, seed=seed))
    ours_loader = make_loader(ours_ds, batch, workers, dev, seed, train=True)
    seed_loader = make_loader(seed_ds, batch, workers, dev, seed, train=True)
    timings = common.alternate(lambda: _pass(ours_loader), lambda: _pass(seed_loader),
                               repeats, warmup, desc="loader passes")
    n = len(table)
    if timings.values["ours"] != n or timings.values["baseline"] != n:
        raise RuntimeError(f"loader benchmark: passes delivered {timings.values}, expected {n}")
    extra: dict[str, Any] = {
        "ours_images_per_s": n / common.median(timings.ours),
        "baseline_images_per_s": n / common.median(timings.baseline),
        "images_per_pass": n,
        "cache_sizes": image_sizes(data_dir / "train" / "imgs", ids),
        "original_sizes": image_sizes(data_dir / ORIGINALS, ids),
    }
    if control:
        ctrl_ds = IsicDataset(table, data_dir / ORIGINALS, train_transform(img_size, seed=seed),
                              data_dir / TRAIN_CSV)
        runs = _timed_passes(make_loader(ctrl_ds, batch, workers, dev, seed, train=True), repeats)
        extra["control_toolkit_dataset_on_originals_images_per_s"] = n / common.median(runs)
    setup = {"images": n, "img_size": img_size, "batch": batch, "num_workers": workers,
             "cache_short_side": extra["cache_sizes"]["max_short_side"]}
    return common.make_result(timings, "s/image", setup, 3.0, scale=1.0 / n, extra=extra)


def main(argv: list[str] | None = None) -> int:
    """Command line: prepare the data if needed, run the comparison, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=1024, help="originals' shorter side")
    parser.add_argument("--size", type=int, default=288, help="cache shorter side")
    parser.add_argument("--img-size", type=int, default=224, help="training input size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    data_dir = prepare_data(args.data_dir, args.num_images, args.image_size, args.size)
    entry = bench_loader(data_dir, args.img_size, args.batch, args.workers, args.repeats)
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

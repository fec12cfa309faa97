"""ISIC 2019 datasets, splits, class weights and seeded data loaders.

Reads the prepared CSVs written by ``run_preprocess.sh`` (format in
``docs/engine.md``)::

    <base>/train/ISIC2019_parsed_train.csv   (+ column ``folder`` 1..5)
    <base>/train/imgs/<image>.jpg
    <base>/test/ISIC2019_parsed_test.csv
    <base>/test/imgs/<image>.jpg

Reproducibility: the training order and every sample's augmentation seed are
drawn by :class:`EpochSampler` from ``(seed, epoch)`` only. A resumed run
therefore sees exactly the batches an uninterrupted run sees, with any number
of loader workers.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from raug.data.transforms import apply_transform, eval_transform, train_transform
from raug.isic2019.schema import CLASS_NAMES as SCHEMA_CLASS_NAMES
from raug.isic2019.tables import METADATA_COLUMNS, metadata_features

# The prepared CSVs' vocabulary is defined once, by the preparation code.
CLASS_NAMES: tuple[str, ...] = SCHEMA_CLASS_NAMES
META_COLUMNS: tuple[str, ...] = METADATA_COLUMNS
TRAIN_CSV = Path("train") / "ISIC2019_parsed_train.csv"
TEST_CSV = Path("test") / "ISIC2019_parsed_test.csv"
_REQUIRED = ("image", *META_COLUMNS, "diagnostic", "diagnostic_number")

# OpenCV's thread pool does not survive fork(): a loader worker that touches it
# (even to resize it) can block forever. Decoding and augmenting one small image
# per call gains nothing from it, and parallelism comes from the loader workers.
cv2.setNumThreads(0)


class DataError(ValueError):
    """Prepared data are missing or malformed; the message names the file."""


# ----------------------------------------------------------------------------- CSVs and splits


def read_parsed_csv(path: str | Path, require_folder: bool = False) -> pd.DataFrame:
    """Read one prepared CSV and check its columns and labels.

    Args:
        path: ``ISIC2019_parsed_train.csv`` or ``ISIC2019_parsed_test.csv``.
        require_folder: also require the integer ``folder`` column (training CSV).

    Returns:
        The table with ``image`` as ``str`` and ``diagnostic_number`` as ``int64``.

    Raises:
        DataError: missing file or column, or labels that disagree with :data:`CLASS_NAMES`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prepared CSV not found: {path} (run run_preprocess.sh first)")
    frame = pd.read_csv(path, dtype={"image": str, "lesion_id": str})
    required = (*_REQUIRED, "folder") if require_folder else _REQUIRED
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    check_labels(frame, path)
    frame["diagnostic_number"] = frame["diagnostic_number"].astype(np.int64)
    if require_folder:
        frame["folder"] = frame["folder"].astype(np.int64)
    frame[list(META_COLUMNS)] = frame[list(META_COLUMNS)].fillna(0.0).astype(np.float32)
    return frame


def check_labels(frame: pd.DataFrame, source: str | Path) -> None:
    """Check that ``diagnostic`` and ``diagnostic_number`` agree with :data:`CLASS_NAMES`.

    Raises:
        DataError: naming ``source`` and the first offending row.
    """
    numbers = pd.to_numeric(frame["diagnostic_number"], errors="coerce")
    in_range = numbers.notna() & (numbers % 1 == 0) & numbers.between(0, len(CLASS_NAMES) - 1)
    expected = numbers.where(in_range, 0).astype(np.int64).map(dict(enumerate(CLASS_NAMES)))
    bad = ~in_range | (frame["diagnostic"].astype(str) != expected)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{source}: row {row + 2} has diagnostic={frame['diagnostic'].iloc[row]!r}, "
            f"diagnostic_number={frame['diagnostic_number'].iloc[row]!r}; expected the "
            f"class codes {list(CLASS_NAMES)} numbered 0..{len(CLASS_NAMES) - 1}"
        )


def available_folds(frame: pd.DataFrame) -> list[int]:
    """Sorted fold numbers present in the training table's ``folder`` column."""
    return sorted(int(f) for f in frame["folder"].unique())


def split_folds(frame: pd.DataFrame, folder: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the training table: train = folds != ``folder``, validation = fold ``folder``."""
    if folder not in available_folds(frame):
        raise DataError(f"_folder={folder} is not one of the folds {available_folds(frame)}")
    is_val = frame["folder"] == folder
    return frame[~is_val].reset_index(drop=True), frame[is_val].reset_index(drop=True)


def fold_class_gaps(frame: pd.DataFrame, folder: int) -> tuple[list[str], list[str]]:
    """Classes without any image in the training folds, and in the validation fold.

    Args:
        frame: the training table (columns ``folder`` and ``diagnostic``).
        folder: the validation fold (``_folder``); the other folds are the training folds.

    Returns:
        ``(absent from the training folds, absent from fold folder)``, each a list of
        :data:`CLASS_NAMES` codes in label order.
    """
    is_val = frame["folder"] == folder

    def absent(labels: pd.Series) -> list[str]:
        present = set(labels.astype(str))
        return [name for name in CLASS_NAMES if name not in present]

    return absent(frame.loc[~is_val, "diagnostic"]), absent(frame.loc[is_val, "diagnostic"])


def class_weights(
    labels: Sequence[int] | np.ndarray,
    num_classes: int = len(CLASS_NAMES),
    weights: str = "frequency",
    use_wce: bool = True,
) -> torch.Tensor | None:
    """Cross-entropy class weights ``w_k = round(n_total / n_k, 3)`` (the seed's rule).

    Args:
        labels: training labels (the training folds only).
        num_classes: number of classes K.
        weights: weighting scheme; only ``"frequency"`` exists.
        use_wce: ``False`` returns ``None`` (unweighted cross-entropy).

    Returns:
        A ``float32`` tensor (K,) or ``None``.

    Raises:
        ValueError: unknown scheme or a class without training images.
    """
    if not use_wce:
        return None
    if weights != "frequency":
        raise ValueError(f"_weights={weights!r} is unknown; allowed: 'frequency'")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    empty = [CLASS_NAMES[k] if num_classes == len(CLASS_NAMES) else k for k in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"class(es) {empty} have no training images: frequency weights undefined")
    total = counts.sum()
    return torch.tensor([round(total / n, 3) for n in counts.tolist()], dtype=torch.float32)


# ----------------------------------------------------------------------------- dataset


def _safe_image_path(img_dir: Path, image_id: str, source: str | Path) -> Path:
    """``img_dir/<image_id>.jpg``, refusing ids that would leave ``img_dir``."""
    bad = (
        not image_id
        or image_id in {".", ".."}
        or any(ch in image_id for ch in ("/", "\\", "\x00"))
        or Path(image_id).name != image_id
    )
    if bad:
        raise DataError(f"{source}: image id {image_id!r} is not a plain file name")
    return img_dir / f"{image_id}.jpg"


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to an (H, W, 3) ``uint8`` RGB array.

    Raises:
        DataError: missing or undecodable file (named in the message).
    """
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise DataError(f"cannot decode image {path} (corrupt or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class IsicDataset(Dataset):
    """Samples of one split of the prepared ISIC 2019 data.

    ``dataset[i]`` or ``dataset[(i, seed)]`` returns::

        {"image": (3, S, S), "label": int64 scalar, "meta": float32 (11,), "id": str}

    ``image`` is what the transform makes: normalised ``float32``, or ``uint8`` for a
    transform built with ``normalise=False`` (:func:`build_data`'s datasets; the engine's
    ``to_device`` normalises those on the device).

    ``meta`` is ``age_approx / 100`` followed by the sex and anatomical-site
    one-hots (:data:`META_COLUMNS`). The ``(i, seed)`` form reseeds the
    transform for this sample (see :class:`EpochSampler`).
    """

    def __init__(self, frame: pd.DataFrame, img_dir: str | Path, transform, source: str | Path):
        """Build the dataset.

        Args:
            frame: rows of a table read by :func:`read_parsed_csv`.
            img_dir: folder holding ``<image>.jpg``.
            transform: an albumentations pipeline from :mod:`raug.data.transforms`.
            source: the CSV the rows come from (named in errors).
        """
        self.img_dir = Path(img_dir)
        self.source = source
        self.transform = transform
        self.ids: list[str] = [str(i) for i in frame["image"]]
        self.paths = [_safe_image_path(self.img_dir, i, source) for i in self.ids]
        self.labels = frame["diagnostic_number"].to_numpy(dtype=np.int64)
        # the encoding predict.py --metadata applies too (raug.isic2019.tables)
        self.meta = torch.from_numpy(metadata_features(frame))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = apply_transform(self.transform, read_rgb(self.paths[index]), seed)
        return {
            "image": image,
            "label": torch.tensor(self.labels[index], dtype=torch.int64),
            "meta": self.meta[index],
            "id": self.ids[index],
        }


# ----------------------------------------------------------------------------- sampling and loaders


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed derived from ``(seed, epoch)`` (independent streams per epoch)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` in an order that depends only on ``(seed, epoch)``.

    Works like ``DistributedSampler``: call :meth:`set_epoch` before each
    epoch. Each index comes with its own augmentation seed, so what a sample
    looks like does not depend on which worker loads it or on how much of an
    RNG earlier epochs consumed.

    With ``num_replicas > 1`` (torchrun) every rank draws the same global
    ``(index, seed)`` sequence, pads it by repeating its head to a multiple of
    ``num_replicas`` (every rank must run the same number of steps) and takes
    every ``num_replicas``-th pair from position ``rank``. With one replica the
    sequence is exactly the single-process one.
    """

    def __init__(
        self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, num_replicas: int = 1
    ):
        """Create the sampler for ``num_samples`` items, seeded by the run ``seed``.

        Args:
            num_samples: dataset length.
            seed: run seed.
            shuffle: random order (``False``: file order).
            rank: this process's rank (0 .. ``num_replicas - 1``).
            num_replicas: number of processes sharing the epoch.
        """
        if not 0 <= rank < num_replicas:
            raise ValueError(f"EpochSampler: rank={rank} is outside num_replicas={num_replicas}")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = rank
        self.num_replicas = num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and seeds :meth:`__iter__` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)  # ceil: padded share of one rank

    def __iter__(self):
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        seeds = torch.randint(0, 2**31 - 1, (self.num_samples,), generator=gen).tolist()
        pairs = list(zip(order, seeds))
        if self.num_replicas > 1:
            total = len(self) * self.num_replicas
            pairs = (pairs * (-(-total // max(len(pairs), 1))))[:total]
            pairs = pairs[self.rank :: self.num_replicas]
        return iter(pairs)


class ShardSampler(Sampler[int]):
    """Evaluation shard of one rank: indices ``rank, rank + R, rank + 2R, ...`` (no padding).

    Together the ranks cover every index exactly once; shards differ in length
    by at most one. :attr:`shard_indices` tells the gathering code where each
    evaluated row belongs (``raug.train.engine.evaluate`` restores the file order).
    """

    def __init__(self, num_samples: int, rank: int, num_replicas: int):
        """Shard ``range(num_samples)`` for ``rank`` of ``num_replicas``."""
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ShardSampler: rank={rank} is outside num_replicas={num_replicas}")
        self.num_samples = num_samples
        self.rank = rank
        self.num_replicas = num_replicas

    @property
    def shard_indices(self) -> list[int]:
        """The dataset indices this rank evaluates, in order."""
        return list(range(self.rank, self.num_samples, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.num_replicas))

    def __iter__(self):
        return iter(self.shard_indices)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed python/numpy in a worker from torch's per-worker seed."""
    info = get_worker_info()
    base = info.seed if info is not None else torch.initial_seed()
    # Libraries that draw from the legacy global RNGs get distinct streams per worker.
    random.seed(base % 2**32)
    np.random.seed(base % 2**32)  # noqa: NPY002


MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else ``os.cpu_count()``, else 1)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve_num_workers(value: int | str | None) -> int:
    """``_num_workers``: an integer is kept; ``None`` (the default) or ``"auto"`` shares the node's CPUs.

    ``None``/``"auto"`` = ``min(8, CPUs // LOCAL_WORLD_SIZE)``, at least 1 when the process may use
    2 or more CPUs, and 0 (load in the main process) on a single CPU. Every process of a
    torchrun node (``LOCAL_WORLD_SIZE``, 1 without torchrun) starts this many workers, so
    together they stay within the CPUs instead of each taking 8. The floor of 1: with
    more processes than CPUs the share rounds to 0, but loading in the main process would
    stall every step, while one worker per process overlaps decoding with the step (the
    main process mostly waits on the GPU). On a single CPU a worker cannot overlap anything
    and only adds process start-up and copies, hence 0.
    """
    if value is not None and value != "auto":
        return int(value)
    cpus = available_cpus()
    if cpus < 2:
        return 0
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:  # raug.train.distributed rejects it before any loader is built
        local = 1
    return max(1, min(MAX_AUTO_WORKERS, cpus // local))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    seed: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A ``DataLoader`` with the project's reproducibility and speed settings.

    Training loaders use :class:`EpochSampler` (shuffled, one augmentation seed
    per sample) and drop the last batch only when it would hold a single
    image, which BatchNorm cannot train on; every other image is used.
    Evaluation loaders keep the file order and every sample.

    Only training loaders keep their workers between passes (``persistent_workers``):
    they run every epoch, and a restart would cost the workers' start-up each time.
    Evaluation loaders start their workers for each pass and let them exit after it, so
    the validation and test workers (their processes and their dataset copies) do not
    stay resident beside the training workers for the whole run.

    Under torchrun (``world_size > 1``) the training sampler gives this rank its
    padded share of the epoch and evaluation loaders a :class:`ShardSampler`
    (each sample on exactly one rank); ``batch_size`` is per process.

    Args:
        dataset: the dataset.
        batch_size: images per batch (per process).
        num_workers: loader processes (0 loads in the main process).
        device: where the batches go (pinned memory only for CUDA).
        seed: run seed.
        train: training (shuffled, augmented) or evaluation loader.
        rank: this process's rank.
        world_size: number of processes.
    """
    if train:
        sampler = EpochSampler(len(dataset), seed, shuffle=True, rank=rank, num_replicas=world_size)
    elif world_size > 1:
        sampler = ShardSampler(len(dataset), rank, world_size)
    else:
        sampler = None
    # Per rank: every rank holds the same number of samples, so all drop alike.
    drop_last = train and len(sampler) % batch_size == 1
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=train and num_workers > 0,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(int(seed)),
        drop_last=drop_last,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Prepare ``loader`` for ``epoch``: sampler order and worker seeds from ``(seed, epoch)``."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if loader.generator is not None and hasattr(sampler, "seed"):
        loader.generator.manual_seed(epoch_seed(sampler.seed, epoch) + 1)


# ----------------------------------------------------------------------------- everything from config


@dataclass
class IsicData:
    """The datasets and loaders of one run (see :func:`build_data`)."""

    class_names: list[str]
    class_weight: torch.Tensor | None
    train: IsicDataset
    val: IsicDataset
    test: IsicDataset
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader


def load_splits(base_path: str | Path, folder: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read the prepared CSVs and return ``(train, val, test)`` tables."""
    base = Path(base_path)
    full = read_parsed_csv(base / TRAIN_CSV, require_folder=True)
    try:
        train, val = split_folds(full, folder)
    except DataError as exc:
        raise DataError(f"{base / TRAIN_CSV}: {exc}") from exc
    test = read_parsed_csv(base / TEST_CSV)
    return train, val, test


def build_data(config: Mapping, device: torch.device, rank: int = 0, world_size: int = 1) -> IsicData:
    """Datasets, class weights and loaders from the shared config keys.

    Uses ``_base_path``, ``_folder``, ``_img_size``, ``_batch_size`` (per
    process), ``_num_workers`` (``"auto"``: :func:`resolve_num_workers`), ``_weights``, ``_use_wce`` and ``seed``. The loaders
    yield ``uint8`` images (N, 3, S, S), not yet normalised (see :func:`raug.train.engine.to_device`);
    ``rank``/``world_size`` shard the loaders under torchrun (see :func:`make_loader`).
    """
    base = Path(config["_base_path"])
    train_df, val_df, test_df = load_splits(base, int(config["_folder"]))
    size = int(config["_img_size"])
    seed = int(config["seed"])
    source = base / TRAIN_CSV
    # uint8 images (4x fewer bytes to collate, pin and copy); raug.train.engine.to_device
    # normalises them on the device with IMAGENET_MEAN/STD, the arithmetic of the CPU path.
    train = IsicDataset(train_df, base / "train" / "imgs",
                        train_transform(size, seed=seed, normalise=False), source)
    val = IsicDataset(val_df, base / "train" / "imgs", eval_transform(size, normalise=False), source)
    test = IsicDataset(test_df, base / "test" / "imgs", eval_transform(size, normalise=False),
                       base / TEST_CSV)
    weight = class_weights(train.labels, len(CLASS_NAMES), config["_weights"], config["_use_wce"])
    workers = resolve_num_workers(config["_num_workers"])

    def loader(ds: IsicDataset, is_train: bool) -> DataLoader:
        return make_loader(
            ds, int(config["_batch_size"]), workers, device, seed, is_train,
            rank=rank, world_size=world_size,
        )

    return IsicData(
        class_names=list(CLASS_NAMES),
        class_weight=weight,
        train=train,
        val=val,
        test=test,
        train_loader=loader(train, True),
        val_loader=loader(val, False),
        test_loader=loader(test, False),
    )

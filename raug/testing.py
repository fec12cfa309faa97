"""Tiny stand-ins for fast CPU tests of the engine and of methods built on it.

Not used by the toolkit itself. :class:`TinyNet` has the model API of
``models.create_model`` (``model(x)``, ``forward_kd``, ``model_name``,
``num_classes``, ``num_features``); :class:`BlobDataset` yields batches in the
format of :class:`raug.data.loaders.IsicDataset` from a learnable synthetic problem.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from raug.data.loaders import CLASS_NAMES, META_COLUMNS, TEST_CSV, TRAIN_CSV


class TinyNet(nn.Module):
    """Conv -> BN -> ReLU -> (dropout) -> pool -> linear: a few hundred parameters."""

    def __init__(self, num_classes: int = 3, width: int = 8, dropout: float = 0.1):
        """Build the network (``dropout`` makes training consume the global torch RNG)."""
        super().__init__()
        self.model_name = "tinynet"
        self.num_classes = num_classes
        self.num_features = width
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward_kd(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"feats_7x7", "avg_pool", "logits"}`` like the project's networks."""
        feats = self.features(x)
        pooled = feats.mean(dim=(2, 3))
        return {"feats_7x7": feats, "avg_pool": pooled, "logits": self.classifier(pooled)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K)."""
        return self.forward_kd(x)["logits"]


def sgd_losses(task, batch: dict, steps: int, lr: float) -> list[float]:
    """Train ``task`` on one fixed ``batch`` for ``steps`` SGD steps (momentum 0.9).

    Returns:
        The loss of every step, taken before that step's update.
    """
    task.train()
    opt = torch.optim.SGD(task.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        out = task.train_step(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return losses


class BlobDataset(Dataset):
    """Images whose mean colour encodes the class, plus seeded per-sample noise.

    ``ds[i]`` and ``ds[(i, seed)]`` return ``{"image", "label", "meta", "id"}``;
    with a seed the noise is drawn from it (the augmentation stand-in), so the
    engine's reproducibility can be tested exactly.
    """

    def __init__(self, n: int = 48, num_classes: int = 3, size: int = 8, seed: int = 0):
        """Create ``n`` samples of ``size`` x ``size`` pixels (class colours shared by all seeds)."""
        centres = torch.randn(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(12345))
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_classes
        self.images = centres[self.labels] + 0.8 * torch.randn(n, 3, size, size, generator=gen)
        self.ids = [f"img_{i:04d}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self.images[index]
        if seed is not None:
            noise_gen = torch.Generator().manual_seed(int(seed))
            image = image + 0.1 * torch.randn(image.shape, generator=noise_gen)
        return {
            "image": image.clone(),
            "label": self.labels[index].clone(),
            "meta": torch.zeros(11),
            "id": self.ids[index],
        }


def write_prepared_dataset(
    root: str | Path, n_train: int = 40, n_test: int = 16, size: int = 40, seed: int = 0, folds: int = 5
) -> Path:
    """Write a tiny dataset in the prepared format (CSVs + JPEGs) under ``root``.

    Class ``k`` of the 8 ISIC classes is drawn as a disc of a class-specific
    colour, cycled over the images so every fold holds every class when
    ``n_train >= 8 * folds``. Returns ``root`` as a ``Path``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 230, size=(len(CLASS_NAMES), 3))

    def split(n: int, name: str, with_folds: bool) -> None:
        rows = []
        (root / name / "imgs").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = i % len(CLASS_NAMES)
            image_id = f"ISIC_{name}_{i:05d}"
            img = np.full((size, size + 8, 3), 200, np.uint8)
            cv2.circle(img, (size // 2 + 4, size // 2), size // 3, colours[label].tolist(), -1)
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / "imgs" / f"{image_id}.jpg"), img[..., ::-1])
            meta = dict.fromkeys(META_COLUMNS, 0.0)
            meta["age_approx"] = float(5 * rng.integers(0, 18))
            meta[("female", "male")[i % 2]] = 1.0
            meta[META_COLUMNS[3 + i % 8]] = 1.0
            row = {"image": image_id, **meta, "lesion_id": f"L{i:05d}",
                   "diagnostic": CLASS_NAMES[label], "diagnostic_number": label}
            if with_folds:
                row["folder"] = 1 + (i // len(CLASS_NAMES)) % folds
            rows.append(row)
        csv = TRAIN_CSV if with_folds else TEST_CSV
        pd.DataFrame(rows).to_csv(root / csv, index=False)

    split(n_train, "train", True)
    split(n_test, "test", False)
    return root

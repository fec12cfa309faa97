"""BASELINE ONLY (benchmarks): the seed's image loading, reading the original full-size JPEGs.

Never imported by the toolkit (``raug.data.loaders.IsicDataset`` reads the prepared cache,
resized at preparation time to a shorter side of 256-300 px). The seed's raug loader
opened every original ISIC JPEG (600x450 up to several thousand pixels a side) with PIL
in every epoch, converted it to RGB and handed the full-size array to the augmentation.

The augmentation itself is the toolkit's (passed in), and samples are addressed like the
toolkit's dataset (``dataset[i]`` or ``dataset[(i, seed)]``), so that both run through the
same ``DataLoader`` settings and the comparison isolates the cost of the input files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from raug.data.transforms import apply_transform


def seed_read_image(path: str | Path) -> np.ndarray:
    """The seed's decode: ``PIL.Image.open(path).convert("RGB")`` as an (H, W, 3) array.

    Raises:
        FileNotFoundError: naming the missing image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"seed loader: original image not found: {path}")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class SeedOriginalsDataset(Dataset):
    """Samples decoded from the original full-size JPEGs, then augmented.

    Args:
        image_dir: folder of the originals (``ISIC_2019_Training_Input``).
        ids: image ids (file names without ``.jpg``).
        labels: class indices, one per id.
        transform: the augmentation (an albumentations pipeline from ``raug.data.transforms``).
    """

    def __init__(self, image_dir: str | Path, ids: Sequence[str], labels: Sequence[int], transform):
        if len(ids) != len(labels):
            raise ValueError(f"seed loader: {len(ids)} ids but {len(labels)} labels")
        self.paths = [Path(image_dir) / f"{i}.jpg" for i in ids]
        self.ids = [str(i) for i in ids]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = apply_transform(self.transform, seed_read_image(self.paths[index]), seed)
        return {
            "image": image,
            "label": torch.tensor(self.labels[index], dtype=torch.int64),
            "id": self.ids[index],
        }

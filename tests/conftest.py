"""Shared fixtures: a synthetic raw ISIC 2019 folder and its prepared version, and a
one-thread torch setting for the files that run full-size networks.

The data fixtures are session-scoped and shared by every test: treat them as read-only
(copy with ``shutil.copytree`` before changing anything).
"""

import shutil
from pathlib import Path

import pytest
import torch

from raug.isic2019 import prepare, synthesize

RAW_IMAGES = 200
RAW_IMAGE_SIZE = 96  # nominal shorter side; actual 96, 120 or 144 px
RAW_SEED = 1234
PREPARED_SIZE = 80  # every prepared image has its shorter side at 80 px


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """Official-format folder: the two CSVs and ``ISIC_2019_Training_Input/`` (200 images)."""
    root = tmp_path_factory.mktemp("isic_raw") / "ISIC2019"
    synthesize(root, num_images=RAW_IMAGES, image_size=RAW_IMAGE_SIZE, seed=RAW_SEED, progress=False)
    return root


@pytest.fixture(scope="session")
def prepared_isic(synthetic_raw, tmp_path_factory) -> Path:
    """``synthetic_raw`` prepared with ``--size 80``: the base path holding train/ and test/."""
    base = tmp_path_factory.mktemp("isic_prepared") / "ISIC2019"
    shutil.copytree(synthetic_raw, base)
    prepare(base, size=PREPARED_SIZE, workers=1, progress=False)
    return base


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a test module (``pytest.mark.usefixtures``).

    Other jobs often share the 2 CPU cores; two intra-op threads then spin against them and
    a ResNet-50 forward gets ~10x slower. One thread keeps these files fast and stable.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory) -> str:
    """``mongodb://127.0.0.1:PORT`` of an nx-27017 server for this session (tests/mongo_server.py).

    Tests share the server: each uses a database of its own. Skipped, with the reason, where
    nx-27017 is not installed (tools/env.sh installs it, so CI has it; offline it may not).
    """
    pytest.importorskip("nx_27017", reason="nx-27017 is not installed (tools/env.sh): "
                                           "no MongoDB server to test against")
    from mongo_server import running

    with running(tmp_path_factory.mktemp("mongo")) as url:
        yield url

"""Download the official ISIC 2019 training files; default root: this folder.

    python data/ISIC2019/download.py [--root DIR] [--base-url URL] [--no-progress]

Resumes interrupted transfers, verifies, and extracts into the layout
``bash run_preprocess.sh`` reads. See ``raug.isic2019.download``.
"""

import sys
from pathlib import Path

from raug.isic2019.download import main

if __name__ == "__main__":
    sys.exit(main(default_root=Path(__file__).resolve().parent))

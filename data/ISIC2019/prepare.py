"""Prepare ISIC 2019 (same as ``bash run_preprocess.sh``); default root: this folder.

    python data/ISIC2019/prepare.py [--root DIR] [--size PX|none] [--workers N] [--group-by-lesion]
"""

import sys
from pathlib import Path

from raug.isic2019.prepare import main

if __name__ == "__main__":
    sys.exit(main(default_root=Path(__file__).resolve().parent))

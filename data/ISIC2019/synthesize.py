"""Write a synthetic ISIC 2019 training set in the official format.

    python data/ISIC2019/synthesize.py --root DIR --num-images N --image-size PX --seed S

Without ``--root`` it writes into this folder (data/ISIC2019), where
``bash run_preprocess.sh`` looks by default. See ``raug.isic2019.synthesize``.
"""

import sys
from pathlib import Path

from raug.isic2019.synthesize import main

if __name__ == "__main__":
    sys.exit(main(default_root=Path(__file__).resolve().parent))

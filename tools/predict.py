"""Predict skin-lesion classes into an ISIC-style CSV; see docs/deploy.md.

Usage: python tools/predict.py --model FILE(.pth|.onnx) --images PATH [PATH ...]
--out preds.csv [--format default|isic2019 [--unk-threshold T]] [--tta] [--batch-size N]
[--device cpu|cuda|auto] [--explain DIR] [--metadata CSV] [--force]

A model that fuses patient metadata needs --metadata (the official metadata CSV format).

With an .onnx model this never imports torch (it runs where only onnxruntime is installed).
"""

import sys

from raug.deploy.predict import main

if __name__ == "__main__":
    sys.exit(main())

"""Export a project checkpoint to ONNX (+ optional int8 / TorchScript); see docs/deploy.md.

Usage: python tools/export.py --checkpoint CKPT --out FILE.onnx [--quantize int8
[--calibration IMAGE_DIR [--calibration-metadata CSV]]] [--torchscript FILE.pt] [--opset N]
[--output probs|logits] [--force]

A checkpoint whose network fuses patient metadata gives a two-input model (image, metadata).
"""

import sys

from raug.deploy.export import main

if __name__ == "__main__":
    sys.exit(main())

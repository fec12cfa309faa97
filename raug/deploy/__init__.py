"""Portable deployment: ONNX/TorchScript export, int8 quantisation, prediction, Grad-CAM.

The subpackage is split so that the ONNX prediction path never imports torch:

* torch-free: :mod:`~raug.deploy.images` (robust image reading), :mod:`~raug.deploy.preprocess`
  (the evaluation transform in numpy + OpenCV, TTA views), :mod:`~raug.deploy.spec` (model
  description and ONNX metadata contract), :mod:`~raug.deploy.onnx_backend` (onnxruntime),
  :mod:`~raug.deploy.quantize` (int8) and :mod:`~raug.deploy.predict` (CSV prediction; imports
  torch lazily only for ``.pth`` models); files are written through the dependency-free
  :mod:`raug.files.atomic`.
* torch: :mod:`~raug.deploy.torch_backend` (checkpoint -> model), :mod:`~raug.deploy.export`,
  :mod:`~raug.deploy.gradcam` and :mod:`~raug.deploy.synthetic` (stand-in images and
  random-weight models for tests and benchmarks).

Usage and the ONNX contract: ``docs/deploy.md``.

Nothing is imported here on purpose: ``import raug.deploy.predict`` must stay torch-free.
"""

"""Data: the prepared ISIC 2019 folds as datasets and loaders, and the image transforms.

* :mod:`raug.data.loaders` -- ``IsicDataset``, class weights, ``build_data`` (the run's loaders)
* :mod:`raug.data.transforms` -- training / evaluation transforms, ImageNet normalisation

Imports :mod:`raug.files` and :mod:`raug.isic2019` only.
"""

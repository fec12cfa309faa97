"""Training: the task contract, the one loop every method shares, and what it needs.

* :mod:`raug.train.task` -- ``Task`` (an ``nn.Module``), ``Method``, ``Phase``, ``RunContext``
* :mod:`raug.train.engine` -- ``fit``: the loop, checkpoints, resume, early stopping
* :mod:`raug.train.device`, :mod:`raug.train.distributed` -- devices, AMP, torchrun
* :mod:`raug.train.metrics`, :mod:`raug.train.outputs`, :mod:`raug.train.early_stopping`

Imports :mod:`raug.files` and :mod:`raug.data` only.
"""

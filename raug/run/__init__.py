"""Running: config keys and checks, the runner, the Sacred glue, sweeps.

* :mod:`raug.run.config` -- the shared keys and their validation
* :mod:`raug.run.runner` -- ``run_training``: a run without any framework
* :mod:`raug.run.experiment`, :mod:`raug.run.kd_experiment` -- the scripts' Sacred experiments
* :mod:`raug.run.pretrained` -- ImageNet weights before a run starts
* :mod:`raug.run.sweep` -- grids of runs (``python -m raug.run.sweep``)

The top layer: the only package that imports Sacred.
"""

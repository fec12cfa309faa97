"""Running: config keys and checks, the runner, the Sacred glue, sweeps.

* :mod:`raug.run.config` -- the shared keys and their validation
* :mod:`raug.run.runner` -- ``run_training``: a run without any framework
* :mod:`raug.run.experiment`, :mod:`raug.run.kd_experiment` -- the scripts' Sacred experiments
* :mod:`raug.run.pretrained` -- ImageNet weights before a run starts
* :mod:`raug.run.sweep`, :mod:`raug.run.launchers`, :mod:`raug.run.sweep_cli` -- grids of
  runs, run locally (sequential or one per device) or as SLURM job arrays (``tools/sweep.py``)

The top layer: the only package that imports Sacred.
"""

"""Fold × seed × grid sweep of an experiment script, resumable; see docs/comparisons.md.

Usage: python tools/sweep.py SCRIPT --folds 1 2 3 4 5 --seeds 0 1 2 --out DIR
       [--grid KEY=V1,V2 ...] [--teachers DIR] [--dry-run | --status]
       [--launcher local [--parallel N --devices D1,...] | --launcher slurm [...]] -- [sacred overrides ...]

The runs die with the sweep (even with kill -9, on Linux), and a rerun never starts a
second writer into a folder whose run is still alive (it waits briefly, then reports it busy).
"""

import sys

from raug.run.sweep_cli import main

if __name__ == "__main__":
    sys.exit(main())

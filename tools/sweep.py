"""Fold × seed × grid sweep of an experiment script, resumable; see docs/comparisons.md.

Usage: python tools/sweep.py SCRIPT --folds 1 2 3 4 5 --seeds 0 1 2 --out DIR
       [--grid KEY=V1,V2 ...] [--teachers DIR] [--dry-run] -- [sacred overrides ...]
"""

import sys

from raug.sweep import main

if __name__ == "__main__":
    sys.exit(main())

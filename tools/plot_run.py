"""Redraw a run's progress plot (success, returns, answer quality, time per iteration).

    python tools/plot_run.py runs/sokoban_cpu-20261124-101500
writes RUN_DIR/progress.png (the trainer also redraws it at every checkpoint).
"""
import sys

from himac.rundir import RunDir

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    path = RunDir(sys.argv[1]).plot()
    print(path if path else f"{sys.argv[1]} has no metrics yet")

"""Convert a run directory's trainer.pt written by an older himac (pickled) to the current format.

    python tools/convert_checkpoint.py RUN_DIR

Resuming reads trainer.pt with torch.load(weights_only=True), which refuses the older,
pickled format because unpickling a file can run code. Run this only on checkpoints you
made yourself: it unpickles the old file once, writes the new one, and keeps the old
one beside it as trainer.pt.legacy.
"""
import sys

from himac.rundir import convert_legacy_trainer_state

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(f"converted {convert_legacy_trainer_state(sys.argv[1])}")

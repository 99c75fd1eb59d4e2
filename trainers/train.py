"""Launcher for `diffdistill train` (works under `accelerate launch` and `torchrun`):

    python trainers/train.py --config configs/demo/regression_digits.yaml train.max_steps=100
"""

import sys

from diffdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

"""Entry point: `python train.py [--config FILE ...] [section.key=value ...]`.

With no --config, runs configs/demo.yaml (a complete distillation on a CPU in minutes).
"""

import sys

from opd.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Public command: `python -m epd_core.train {distill,rl} ...` (epd_core/training/cli.py; torchrun works the same)."""
import sys

from epd_core.training.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

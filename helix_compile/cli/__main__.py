"""`python -m helix_compile.cli ...`: the `helix` command (what torchrun runs on each rank)."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())

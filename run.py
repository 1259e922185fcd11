"""Command line entry: `python run.py --help`. All logic lives in offload_moe.cli."""

import sys

from offload_moe.cli.entry import main

if __name__ == "__main__":
    sys.exit(main())

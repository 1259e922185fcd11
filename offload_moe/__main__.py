"""`python -m offload_moe`: the command line (`cli.entry`)."""

import sys

from offload_moe.cli.entry import main

if __name__ == "__main__":
    sys.exit(main())

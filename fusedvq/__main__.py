"""`python -m fusedvq …`: the same command line as `fusedvq …`."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""python -m fusedvq.tools.benchmark: the same as `fusedvq bench`."""

import sys

from . import main

sys.exit(main())

"""``python -m lmgen`` = the ``lmgen`` console script."""

import sys

from lmgen.cli import main

sys.exit(main())

"""``python -m moetier``: the same command line as the ``moetier`` script."""

import sys

from moetier.cli import main

sys.exit(main())

"""``python -m describer``: the command line (see :mod:`describer.cli`)."""

import sys

from .cli import main

sys.exit(main())

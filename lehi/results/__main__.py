"""``python -m lehi.results``: see :mod:`lehi.results.cli`."""

import sys

from lehi.results.cli import main

sys.exit(main())

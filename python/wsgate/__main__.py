"""``python -m wsgate``: the ``wsgate`` command."""

import sys

from .cli import main

sys.exit(main())

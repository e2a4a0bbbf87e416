"""``python -m fp8ctx``: the same as the ``fp8ctx`` console script."""

import sys

from ._cli import main

sys.exit(main())

"""``python -m mipsec.cli``: the same as ``python -m mipsec``."""

import sys

from mipsec.cli import main

sys.exit(main())

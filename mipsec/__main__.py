"""``python -m mipsec``: the same as the ``mipsec`` command."""

import sys

from mipsec.cli import main

sys.exit(main())

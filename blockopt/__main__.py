"""``python -m blockopt``: the command line."""

import sys

from blockopt.cli.main import main

sys.exit(main())

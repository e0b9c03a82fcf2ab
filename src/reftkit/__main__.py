"""`python -m reftkit` runs the command line."""

import sys

from reftkit.cli import main

sys.exit(main())

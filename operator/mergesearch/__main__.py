"""`python -m mergesearch` is the same as the `mergesearch` command."""

import sys

from mergesearch.cli import main

sys.exit(main())

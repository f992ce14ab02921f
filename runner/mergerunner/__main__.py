"""`python -m mergerunner` is the same as the `mergerunner` command."""

import sys

from mergerunner.cli import main

sys.exit(main())

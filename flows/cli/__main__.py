"""`python -m flows.cli`: the same as the `adapt` command."""

import sys

from flows.cli import main

sys.exit(main())

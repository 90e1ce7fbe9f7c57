"""`python -m apishield` is the `apishield` command."""

import sys

from apishield.cli import main

sys.exit(main())

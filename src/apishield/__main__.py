"""`python -m apishield` is the `apishield` command."""

import sys

from apishield.cli.main import main

sys.exit(main())

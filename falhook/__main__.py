"""`python -m falhook` runs the `falhook` command line."""

import sys

from falhook.receiver.cli import main

sys.exit(main())

import sys

from falhook.receiver.cli import main

sys.exit(main())

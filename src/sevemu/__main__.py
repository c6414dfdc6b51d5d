"""``python -m sevemu`` runs the command line."""

import sys

from sevemu.cli.main import main

sys.exit(main())

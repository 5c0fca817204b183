"""``python -m pyrovae`` runs the CLI."""

import sys

from pyrovae.cli import main

sys.exit(main())

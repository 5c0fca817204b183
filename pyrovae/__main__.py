"""``python -m pyrovae`` runs the CLI."""

import sys

from pyrovae.app.cli import main

sys.exit(main())

"""``python -m vmfx``: the ``vmfx`` command (also what ``torchrun -m vmfx`` runs in every process)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m vmfx``: the ``vmfx`` command (:mod:`vmfx.cli`)."""

import sys

from .cli import main

sys.exit(main())

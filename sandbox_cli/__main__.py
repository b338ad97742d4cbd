"""``python -m sandbox_cli``: the ``sandbox`` command."""

import sys

from ._cli import main

sys.exit(main())

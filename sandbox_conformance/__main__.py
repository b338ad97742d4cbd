"""``python -m sandbox_conformance URL``: the same as ``sandbox conformance URL``."""

import sys

from ._cli import main

sys.exit(main())

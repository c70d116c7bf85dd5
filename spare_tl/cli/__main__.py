"""``python -m spare_tl.cli``: the same as the ``spare-tl`` command."""

import sys

from spare_tl.cli import main

sys.exit(main())

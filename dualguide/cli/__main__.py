"""``python -m dualguide.cli``: the ``dualguide`` command."""

import sys

from . import main

sys.exit(main())

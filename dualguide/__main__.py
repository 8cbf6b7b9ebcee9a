"""``python -m dualguide``: the ``dualguide`` command (as launchers such as ``torchrun -m`` and ``accelerate launch -m`` run it)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m tileserver`` is the ``tileserver`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m rqat_sdk`` is the ``rqat`` command."""

import sys

from rqat_sdk.cli import main

sys.exit(main())

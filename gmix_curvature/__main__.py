"""``python -m gmix_curvature`` (also under ``torchrun``) runs the ``gmix`` command line."""

import sys

from gmix_curvature.cli import main

sys.exit(main())

"""``python -m megatron.flexsp.convert``: the same as the ``flexsp-convert`` console script."""

import sys

from .cli import main

sys.exit(main())

"""``python -m scripts.client``: see the package's docstring."""

import sys

from scripts.client.cli import main

sys.exit(main())

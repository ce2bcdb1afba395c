"""``python -m scripts.loadtest``: one load test run (``run.main``)."""

import sys

from scripts.loadtest.run import main

sys.exit(main())

"""``python -m bench.drills``: see :mod:`bench.drills`."""
import sys

from bench.drills import main

sys.exit(main())

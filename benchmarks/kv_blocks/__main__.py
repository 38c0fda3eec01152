"""``python -m benchmarks.kv_blocks``."""

import sys

from benchmarks.kv_blocks.cli import main

sys.exit(main())

"""``python -m civic_vllm.cli ARGS`` = ``civic ARGS``."""

import sys

from civic_vllm.cli import main

sys.exit(main())

"""``python -m civic_vllm.planner`` = ``civic plan``."""

import os
import sys

from civic_vllm.planner.cli import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.exit(main())

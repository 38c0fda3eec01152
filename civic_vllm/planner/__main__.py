"""``python -m civic_vllm.planner`` = ``civic plan``."""

import os
import sys

from civic_vllm.cli.plan import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.exit(main())

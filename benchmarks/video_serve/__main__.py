"""``python -m benchmarks.video_serve``."""

import sys

from benchmarks.harness import BenchError
from benchmarks.video_serve.cli import main
from civic_vllm.serving import ServerError

try:
    sys.exit(main())
except (BenchError, ServerError) as exc:
    print(f"benchmarks.video_serve: could not measure: {exc}", file=sys.stderr)
    sys.exit(1)

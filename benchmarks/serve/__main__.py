"""``python -m benchmarks.serve``."""

import sys

from benchmarks.harness import BenchError
from benchmarks.serve.cli import main
from civic_vllm.serving import ServerError

try:
    sys.exit(main())
except (BenchError, ServerError) as exc:
    print(f"benchmarks.serve: could not measure: {exc}", file=sys.stderr)
    sys.exit(1)

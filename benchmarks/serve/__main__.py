"""``python -m benchmarks.serve``."""

import sys

from benchmarks.kv_blocks import BenchError as KvBenchError
from benchmarks.serve.cli import main
from benchmarks.serve.common import BenchError
from civic_vllm.serving import ServerError

try:
    sys.exit(main())
except (BenchError, KvBenchError, ServerError) as exc:
    print(f"benchmarks.serve: could not measure: {exc}", file=sys.stderr)
    sys.exit(1)

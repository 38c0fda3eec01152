"""``python -m tools.docs_gen [--check]`` (``make docs``)."""

import sys

from tools.docs_gen.markdown import main

sys.exit(main())

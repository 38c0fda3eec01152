import os

# Kernel tests run Triton through its interpreter on CPU tensors; the variable must be
# set before triton is first imported anywhere in the test session.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

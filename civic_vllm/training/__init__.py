"""Training the small Qwen3-VL that accuracy is measured on (civic-shapes, from scratch on CPU).

Import from :mod:`civic_vllm.training.train`; nothing is re-exported here, so that importing
the package stays cheap (no torch) and ``training.train`` keeps naming the module.
"""

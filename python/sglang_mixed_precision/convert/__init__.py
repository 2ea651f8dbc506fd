"""16-bit model -> fp16/ fp8/ int4/ model directories in the formats official releases use.

``fp8_block``  FP8-E4M3 with one float32 scale per 128x128 tile (Qwen3-FP8 / DeepSeek-V3 layout)
``gptq_pack``  GPTQ v1 int4 packing (qweight / qzeros / scales / g_idx) and its symmetric grid
``gptq``       the GPTQ algorithm (Hessian, dampening, blocked error compensation, act-order)
``calibration``calibration tokens and layer-by-layer activation capture (MoE routing included)
``arguments``  every argument checked before anything is read or written
``ownership``  the output's owner record; overlap with the input and foreign files refused
``files``      atomic writes; a full disk or a denied write as named errors
``writer``     streaming safetensors shards, index and resume state (finished shards verified)
``dequant``    independent dequantizers used to verify outputs (and by the reference forward)
``device``     ``--device`` (cuda by default with a GPU) and the hand-offs of tensors between threads
``overlap``    the reader thread (prefetches the next unit) and the writer thread (flushes shards)
``pipeline``   the conversion driver behind ``sglang-mp convert``
"""

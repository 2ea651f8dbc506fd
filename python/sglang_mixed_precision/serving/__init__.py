"""SGLang glue: the only subpackage that imports SGLang.

``plugin``        entry point run by SGLang in every process: registers the ``mixed_precision``
                  quantization method and selects the mixed loader when it is active
``quant_config``  :class:`MixedPrecisionConfig`, one SGLang method object per layer from the plan
``methods``       the tables: which SGLang method class runs which layer kind x format, the stock
                  config of each source, the int4 MoE kernels and how ``auto`` picks one
``loader``        :class:`MixedPrecisionModelLoader`, streams each source's planned tensors
``audit``         post-load checks: methods, tensors consumed once, no parameter left unloaded
``plandir``       the plan directory (config.json + tokenizer) plain ``sglang.launch_server`` serves
``launcher``      ``launch_mixed_precision_server.py``: validate the plan, then start SGLang
"""

QUANT_METHOD = "mixed_precision"

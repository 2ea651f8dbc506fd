"""SGLang glue: the only subpackage that imports SGLang.

``plugin``        entry point run by SGLang in every process: registers the ``mixed_precision``
                  quantization method, the hooks, and (main process) the routes
``hooks``         every hook placed on SGLang (target, kind, function): loader selection, the
                  workers' reload and info
``quant_config``  :class:`MixedPrecisionConfig`, one SGLang method object per layer from the plan
``methods``       the tables: which SGLang method class runs which layer kind x format, the stock
                  config of each source, the int4 MoE kernels and how ``auto`` picks one
``loader``        :class:`MixedPrecisionModelLoader`, streams each source's planned tensors
``audit``         post-load checks: methods, tensors consumed once, no parameter left unloaded
``plandir``       the plan directory (config.json + tokenizer) plain ``sglang.launch_server`` serves
``launcher``      ``launch_mixed_precision_server.py``: validate the plan, then start SGLang
``messages``      what the main process and the workers tell each other (reload request, reply, info)
``reload_worker`` a reload in a scheduler process: stage, agree across TP ranks, apply, restore
``info``          ``/mixed_precision/info``: a worker's report of its rank, the reply built from the plan
``restart``       managed restart requests between the runtime and the launcher
``service``       the main process's reload / info service: the active mix, one reload at a time
``routes``        the service's HTTP routes on SGLang's app and the ``sglang.Engine`` methods
"""

QUANT_METHOD = "mixed_precision"

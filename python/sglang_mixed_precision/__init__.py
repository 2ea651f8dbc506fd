"""Serve one model assembled from several checkpoints of different precision with SGLang.

The planning core (``config``, ``naming``, ``sources``, ``formats``, ``plan``) imports nothing
from SGLang or torch; SGLang glue lives in ``serving``; the converter in ``convert``.
"""

__version__ = "0.1.0"

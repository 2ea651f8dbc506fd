"""The planning core: config, checkpoint headers, formats and the plan. Imports neither torch nor SGLang."""

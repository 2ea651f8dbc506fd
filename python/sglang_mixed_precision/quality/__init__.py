"""What a mix costs in quality: KL divergence against the 16-bit model (metrics), per-unit
sensitivity, and the mix that fits a memory budget best (see core/autoplan.py for the optimizer)."""

"""Models and checkpoints made for tests, GPU proofs, benchmarks and the demo (tiny random models, shape-only checkpoints)."""

"""Layers every model family shares: numerics (each torch/JAX default that differs, named once), primitives
(Linear, Conv, norms, GEGLU, FeedForward), checks (argument and shape validation)."""

"""Kernels behind one interface; optional GPU packages (flash-attn, Transformer Engine) are imported lazily.

- `attention`: attention back-ends (eager, sdpa, flash-attn) and the log-sum-exp block forms used by ring attention.
- `norms`: normalisation layers.
"""

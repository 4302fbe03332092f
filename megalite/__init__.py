"""megalite: Megatron-style 5D-parallel (TP, CP, PP, EP/ETP, DP) training of GPT models on PyTorch."""

__version__ = "0.1.0"

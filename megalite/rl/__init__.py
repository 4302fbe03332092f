"""RL post-training (GRPO, GSPO): its flags and derived step counts, and its loss functions (docs/rl.md)."""

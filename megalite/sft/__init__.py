"""Supervised fine-tuning on conversations (`megalite train --sft`): conversation files, chat formats with the loss
mask on the assistant's tokens, and packed datasets whose conversations do not see each other (docs/sft.md)."""

"""Training: data, packing, LoRA, the trainer loop and its CLI (issue 11)."""

"""Checkpoint and config conversion between Hugging Face, mmgraph and the LLaVA repository."""

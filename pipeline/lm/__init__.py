"""Causal language models: token-level caching, mis-instruction and LoCa (issue 7)."""

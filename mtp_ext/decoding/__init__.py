"""Decoding with an MTP model: generate.py, plain and self-speculative decoding (draft trees,
speculative sampling); packed_linear.py, decoding's prepacked CPU products."""

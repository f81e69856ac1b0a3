"""Synthetic marketplace, image decoding and (later) datasets and tokenization."""

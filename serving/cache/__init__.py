"""Semantic cache: cache key, vector index, verifier, store, embedder (no Ray here)."""

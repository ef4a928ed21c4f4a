"""Semantic cache: cache key, vector index, second check, store, embedder (no Ray here)."""

"""Plain data the semantic cache stores and returns (pydantic, so it crosses Ray handles intact)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class CachedAnswer(BaseModel):
    """A finished answer as the router stores it and replays it on a hit."""

    model_config = ConfigDict(frozen=True)

    text: str
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int


class CacheHit(BaseModel):
    """A lookup's answer: the stored answer, the cosine similarity of the two prompts, and whether the
    prompt was an exact repeat (same text after normalising whitespace and case)."""

    answer: CachedAnswer
    similarity: float
    exact: bool

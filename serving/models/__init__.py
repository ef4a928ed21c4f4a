"""Models shipped with the package, and where the default model comes from.

`EMBEDDED_TARGET` / `EMBEDDED_DRAFT` are Hugging Face folders trained by `python -m serving.models.train`
(see embedded/README.md). Until they exist the default model is a tiny random Llama made on first use
(`serving.models.tiny`), with a fixed seed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_TARGET = EMBEDDED_DIR / "target"
EMBEDDED_DRAFT = EMBEDDED_DIR / "draft"
DEFAULT_MODEL_NAME = "embedded"


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def default_model_path() -> str:
    """The embedded target if it is shipped, else a tiny random model in the user's cache folder."""
    if _is_model_dir(EMBEDDED_TARGET):
        return str(EMBEDDED_TARGET)
    from serving.models.tiny import make_tiny_model

    cache = Path(os.environ.get("SERVING_CACHE_DIR", Path.home() / ".cache" / "ray-llm-serving"))
    return make_tiny_model(cache / "tiny-llama")


def default_draft_path() -> Optional[str]:
    return str(EMBEDDED_DRAFT) if _is_model_dir(EMBEDDED_DRAFT) else None

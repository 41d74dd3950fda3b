"""The embedding model: loaded once per process that needs it, on first use.

Two backends run the same model (EMBED_BACKEND): torch through sentence-transformers, or
ONNX Runtime on an fp32 graph exported from the same packaged folder.
Both give the same name and dimensions, so an index built with one accepts vectors from
the other; the vectors differ slightly (`python -m bench.embed_backends` measures by how much).

Nothing here imports torch or onnxruntime at module import time; `get_encoder()` does, once.
"""

from __future__ import annotations

import json
import threading
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from jobs.index.model import model_dimensions, model_path
from jobs.settings import BACKENDS, get_settings

if TYPE_CHECKING:
    import numpy as np


def max_seq_length(path: Path) -> int:
    """Tokens per text the model reads; sentence-transformers truncates the rest."""
    with open(path / "sentence_bert_config.json") as config:
        return int(json.load(config)["max_seq_length"])


class TextEncoder(Protocol):
    """What the embed jobs and search need of an encoder, whichever the backend."""

    name: str
    dimensions: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


class Encoder:
    """Texts to unit-length float32 vectors with torch, so inner product is cosine similarity."""

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


class OnnxEncoder:
    """The same vectors as `Encoder` (to within float error), from ONNX Runtime.

    Mean pooling over the attention mask and L2 normalization, as the model's
    sentence-transformers modules do. Texts are sorted by length into batches so that
    short texts are not padded to a long one's length; rows come back in input order.
    """

    def __init__(self, path: Path, onnx_path: Path, threads: int, batch_size: int, name: str) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        self.name = name
        self.batch_size = batch_size
        self.dimensions = model_dimensions(path)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        # The file pads every text to 128 tokens and cuts at 128: the model reads up to
        # max_seq_length, and each batch is padded here, to its longest text.
        self.tokenizer.enable_truncation(max_seq_length(path))
        self.tokenizer.no_padding()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        # Fast tokenizers are not safe to share between threads; one encode at a time.
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """One (len(texts), dimensions) array; many texts are encoded in batches of similar length."""
        import numpy as np

        vectors = np.empty((len(texts), self.dimensions), dtype=np.float32)
        with self._lock:
            encodings = self.tokenizer.encode_batch(texts)
            order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                vectors[rows] = self._encode_batch([encodings[i] for i in rows])
        return vectors

    def _encode_batch(self, encodings: list) -> np.ndarray:
        import numpy as np

        length = max(len(encoding.ids) for encoding in encodings)
        ids = np.zeros((len(encodings), length), dtype=np.int64)  # padding is masked: any id will do
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            types[row, :n] = encoding.type_ids
            mask[row, :n] = encoding.attention_mask
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = self.session.run(["last_hidden_state"], feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)


@cache
def get_encoder() -> TextEncoder:
    """This process's encoder, of the EMBED_BACKEND backend (forked work-horses inherit it, warm)."""
    settings = get_settings()
    path, name = model_path(), settings.embed_model_name
    if settings.embed_backend == "torch":
        return Encoder(path, settings.embed_threads, settings.embed_batch_size, name)
    if settings.embed_backend not in BACKENDS:
        raise ValueError(
            f"EMBED_BACKEND must be one of {', '.join(BACKENDS)}, got {settings.embed_backend!r}"
        )
    from jobs.index.onnx_export import ensure_onnx

    return OnnxEncoder(path, ensure_onnx(path, name), settings.embed_threads, settings.embed_batch_size, name)

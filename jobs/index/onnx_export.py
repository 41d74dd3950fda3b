"""The ONNX file of the embedding model, built offline from the packaged sentence-transformers folder.

    python -m jobs.index.onnx_export      # builds it ahead of time, prints its path

The transformer is exported with torch (fp32); pooling and normalization stay in Python. The
export runs in a child process, so the process that asked (a web process, an embedder) never
loads torch. Files live in EMBED_MODEL_CACHE, named after the model and a digest of its
weights, so a changed model folder is exported afresh. The file is written to a temporary
name and renamed into place, under a file lock: processes starting together export it once,
and none ever reads a half-written file. Nothing is downloaded. (An int8-quantized variant
was withdrawn: jobs.settings.WITHDRAWN_BACKENDS.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

from jobs.files import write_atomically
from jobs.settings import get_settings

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "last_hidden_state"
OPSET = 17
# A process waits this long for another one's export before it gives up (seconds).
LOCK_TIMEOUT = 600
# Largest difference allowed between the exported graph and torch on a check batch.
EXPORT_TOLERANCE = 1e-3


def cache_dir() -> Path:
    """EMBED_MODEL_CACHE, created if missing."""
    path = Path(get_settings().embed_model_cache)
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_digest(path: Path) -> str:
    """A short digest of the model's config and weights: a retrained model gets new files."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        file = path / name
        if file.exists():
            digest.update(name.encode())
            with open(file, "rb") as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:12]


def onnx_file(path: Path, name: str) -> Path:
    """Where the ONNX file of the model in `path` lives (whether built or not)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-")
    return cache_dir() / f"{slug}-{model_digest(path)}-fp32.onnx"


def ensure_onnx(path: Path, name: str) -> Path:
    """The ONNX file of the model in `path`, exported now unless already there."""
    from filelock import FileLock

    target = onnx_file(path, name)
    if target.exists():
        return target
    with FileLock(f"{target}.lock", timeout=LOCK_TIMEOUT):
        if target.exists():  # another process exported it while this one waited
            return target
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by an exporter killed mid-way
            stale.unlink()
        log.info("exporting %s to ONNX (%s)", name, target)
        write_atomically(target, lambda temporary: _in_child("export_fp32", path, temporary))
    return target


def _in_child(step: str, source: Path, target: Path) -> None:
    """Run an export step in a process of its own: torch and the exporter's memory go with it,
    so a process that only runs the ONNX graph (a web process) never holds torch."""
    code = (
        "import sys; from pathlib import Path; from jobs.index import onnx_export as m; "
        f"m.{step}(Path(sys.argv[1]), Path(sys.argv[2]))"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-c", code, str(source), str(target)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"ONNX {step} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


def export_fp32(path: Path, target: Path) -> None:
    """The model's transformer as an ONNX graph: token ids, mask and types to last_hidden_state.

    Batch and sequence axes are dynamic. The graph is traced on a padded batch, so the path
    that applies the attention mask is the one recorded, then checked against torch on a
    batch of another shape, padding included.
    """
    import torch
    from transformers import AutoModel

    # Eager attention: plain matrix products and a softmax. The SDPA path turns tensor shapes
    # into Python booleans, which a trace would freeze.
    model = _last_hidden_state(AutoModel.from_pretrained(str(path), attn_implementation="eager"))
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, OUTPUT)}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter (it needs no onnxscript) is deprecated and warns about what
        # tracing cannot see; the check below is what tells whether the graph is right.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            _sample_batch(batch=2, length=8),
            str(target),
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    _check_export(model, target)


def _last_hidden_state(model):
    """The model called with keyword arguments, returning only last_hidden_state: what is exported."""
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            outputs = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return outputs.last_hidden_state

    return LastHiddenState().eval()  # the exporter restores this mode on every submodule


def _sample_batch(batch: int, length: int) -> tuple:
    """Random token ids, mask and types, the last row padded after half its length."""
    import torch

    generator = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(1000, 20000, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, length // 2 :] = 0
    ids[-1, length // 2 :] = 0
    return ids, mask, torch.zeros_like(ids)


def _check_export(model, target: Path) -> None:
    import numpy as np
    import onnxruntime
    import torch

    batch = _sample_batch(batch=3, length=13)
    with torch.no_grad():
        expected = model(*batch).numpy()
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    actual = session.run(
        [OUTPUT], {name: tensor.numpy() for name, tensor in zip(INPUTS, batch, strict=True)}
    )[0]
    kept = batch[1].numpy().astype(bool)  # padded positions are never pooled
    error = float(np.abs(actual[kept] - expected[kept]).max())
    if error > EXPORT_TOLERANCE:
        raise RuntimeError(f"the exported ONNX graph differs from torch by {error:.2g}")


def main() -> None:
    from jobs.index.model import model_path

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_onnx(model_path(), get_settings().embed_model_name), flush=True)


if __name__ == "__main__":
    main()

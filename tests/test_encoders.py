"""The ONNX backend of the encoder: exported from the packaged model, and agreeing with torch."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tqdm.std
from filelock import FileLock, Timeout

from jobs.index import embedding, onnx_export
from jobs.settings import Settings
from scripts.embedded_redis import free_port
from scripts.stack import procfile_command, procfile_env

MODEL = Settings.embed_model_name
ROOT = Path(__file__).resolve().parents[1]

# A small corpus of unrelated topics, four documents each, and queries that paraphrase them.
CORPUS = [
    "The cat curled up on the warm windowsill and slept all afternoon.",
    "Our kitten chases the red laser dot around the living room.",
    "The old tabby purrs loudly whenever someone scratches behind its ears.",
    "Cats groom themselves for hours with their rough tongues.",
    "Knead the dough for ten minutes, let it rise, then bake the loaf at 220 degrees.",
    "Sourdough needs a starter that has been fed with flour and water for days.",
    "The bakery on the corner sells fresh baguettes every morning.",
    "A pinch of salt and a little yeast are all this simple bread needs.",
    "Shares tumbled on Wall Street as investors feared rising interest rates.",
    "The central bank raised rates by half a point to fight inflation.",
    "Tech stocks rallied after the quarterly earnings beat expectations.",
    "Bond yields climbed to their highest level in a decade.",
    "The striker scored twice in the second half to win the championship final.",
    "The goalkeeper saved a penalty in the last minute of extra time.",
    "Fans filled the stadium to watch the derby between the two rival clubs.",
    "The coach was sacked after the team lost five league matches in a row.",
    "Lava poured from the crater after the eruption forced villagers to flee.",
    "Ash from the volcano grounded flights across the region for a week.",
    "Scientists monitor tremors beneath the mountain to predict the next eruption.",
    "The island was formed by volcanic activity millions of years ago.",
    "The interpreter raised an exception because the variable was never defined.",
    "A missing semicolon caused the compiler to reject the whole file.",
    "The unit tests failed after the refactoring changed the function signature.",
    "She fixed the memory leak by closing the file handles in a finally block.",
    "Heavy showers and thunderstorms are expected across the region tomorrow.",
    "A cold front will bring snow to the mountains by the weekend.",
    "The heatwave pushed temperatures above forty degrees for the third day.",
    "Fog delayed the morning ferries until the visibility improved.",
    "She tuned the strings of her acoustic instrument before the concert.",
    "The orchestra rehearsed the symphony for the opening night.",
    "He practised scales on the piano every evening for an hour.",
    "The band released a new album recorded in a small studio by the sea.",
    "Tomatoes and peppers need plenty of sun and regular watering.",
    "Prune the roses in late winter before the new shoots appear.",
    "Compost from kitchen scraps makes the vegetable beds richer.",
    "Slugs ate most of the lettuce seedlings overnight.",
    "The train to the airport was cancelled because of a signal failure.",
    "Cyclists asked the city for protected lanes on the main avenue.",
    "Traffic jams on the ring road doubled the commute time.",
    "The new tram line connects the suburbs with the old town.",
]
QUERIES = [
    "a kitten napping in the sun",
    "how to make a homemade loaf",
    "the equity market dropped",
    "soccer match goals",
    "molten rock and evacuation",
    "a programming error in my code",
    "weather forecast with storms",
    "musician preparing to play a show",
    "growing vegetables in the garden",
    "public transport problems in the city",
]
# One text longer than the model's 256 tokens, whose topic changes after its first 128: a
# tokenizer left at tokenizer.json's own 128-token cut would miss the second topic.
LONG = " ".join(["The cat slept on the sofa all day long."] * 14 + ["Stock prices crashed on Monday."] * 40)


# What a process that needs the ONNX encoder does first: export the graph, encode.
FIRST_USE = (
    "import sys, jobs; from jobs.index.embedding import get_encoder; "
    "get_encoder().encode(['warm up']); print('torch loaded' if 'torch' in sys.modules else 'no torch')"
)


@pytest.fixture(scope="module")
def first_use(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The ONNX file, built by the first process that needs it into a cache of the module's
    own, and what that process said about torch."""
    cache = tmp_path_factory.mktemp("models") / "not-yet-there"
    env = dict(os.environ, EMBED_MODEL_CACHE=str(cache), EMBED_BACKEND="onnx")
    done = subprocess.run(
        [sys.executable, "-c", FIRST_USE], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return cache, done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def onnx_cache(first_use: tuple[Path, str]) -> Path:
    return first_use[0]


@pytest.fixture(scope="module")
def torch_encoder() -> Iterator[embedding.Encoder]:
    # sentence-transformers' encode makes a progress bar even when it shows none, and tqdm
    # starts a monitor thread for every bar, which would outlive the test by ten seconds.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tqdm.std.tqdm, "monitor_interval", 0)
        yield embedding.Encoder(embedding.model_path(), threads=1, batch_size=8, name=MODEL)


@pytest.fixture
def encoder_for(onnx_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """`encoder_for("onnx", EMBED_BATCH_SIZE=2)`: get_encoder() as a process with those settings."""

    def make(backend: str, **settings: object) -> embedding.TextEncoder:
        monkeypatch.setenv("EMBED_BACKEND", backend)
        monkeypatch.setenv("EMBED_MODEL_CACHE", str(onnx_cache))
        for name, value in settings.items():
            monkeypatch.setenv(name, str(value))
        embedding.get_settings.cache_clear()
        embedding.get_encoder.cache_clear()
        return embedding.get_encoder()

    yield make
    embedding.get_encoder.cache_clear()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def top_k(queries: np.ndarray, documents: np.ndarray, k: int) -> list[set[int]]:
    return [set(np.argsort(-scores, kind="stable")[:k]) for scores in queries @ documents.T]


def test_the_first_process_to_need_the_graph_exports_it_without_loading_torch(first_use, capsys):
    onnx_cache, said = first_use
    files = sorted(path.name for path in onnx_cache.glob("*.onnx"))
    assert len(files) == 1
    assert files[0].startswith("sentence-transformers--all-MiniLM-L6-v2-") and files[0].endswith("-fp32.onnx")
    assert not [path for path in onnx_cache.iterdir() if path.name.endswith(".tmp")]
    # The export ran in child processes: torch never entered the process that asked.
    assert said == "no torch"
    # The export command finds them built and names them.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBED_MODEL_CACHE", str(onnx_cache))
        embedding.get_settings.cache_clear()
        onnx_export.main()
        embedding.get_settings.cache_clear()
    assert sorted(Path(line).name for line in capsys.readouterr().out.split()) == files


@pytest.fixture
def exports_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Export steps run in this process, where the tests below replace them."""
    monkeypatch.setattr(
        onnx_export, "_in_child", lambda step, source, target: getattr(onnx_export, step)(source, target)
    )


def test_the_onnx_encoder_returns_unit_float32_rows(encoder_for, torch_encoder):
    encoder = encoder_for("onnx")
    assert isinstance(encoder, embedding.OnnxEncoder)
    vectors = encoder.encode([*CORPUS[:5], LONG, ""])
    assert vectors.shape == (7, 384)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # An index built with one backend accepts the other's vectors: same model name and size.
    assert (encoder.name, encoder.dimensions) == (torch_encoder.name, torch_encoder.dimensions)
    assert encoder.encode([]).shape == (0, 384)


def test_rows_come_back_in_input_order(encoder_for):
    encoder = encoder_for("onnx", EMBED_BATCH_SIZE=2)
    # Lengths in no order, so that sorting by length moves texts between batches of two.
    texts = [CORPUS[0] * 3, "volcano", CORPUS[20], LONG, CORPUS[8] * 2, "a tram", CORPUS[28], CORPUS[13] * 4]
    together = encoder.encode(texts)
    alone = np.vstack([encoder.encode([text]) for text in texts])
    # Each row is its own text's, whatever batch it was encoded in.
    assert list(np.argmax(together @ alone.T, axis=1)) == list(range(len(texts)))
    assert cosines(together, alone).min() >= 0.9999


def test_fp32_onnx_agrees_with_torch_on_every_text(encoder_for, torch_encoder):
    texts = [*CORPUS, *QUERIES, LONG, ""]
    theirs = torch_encoder.encode(texts)
    ours = encoder_for("onnx").encode(texts)
    worst = cosines(ours, theirs)
    assert worst.min() >= 0.999, texts[int(worst.argmin())]


def test_onnx_retrieves_what_torch_retrieves(encoder_for, torch_encoder):
    encoder = encoder_for("onnx")
    theirs_q, theirs_d = torch_encoder.encode(QUERIES), torch_encoder.encode(CORPUS)
    ours_q, ours_d = encoder.encode(QUERIES), encoder.encode(CORPUS)
    pairs = zip(top_k(ours_q, ours_d, 10), top_k(theirs_q, theirs_d, 10), strict=True)
    assert np.mean([len(ours & theirs) / 10 for ours, theirs in pairs]) >= 0.99


def test_the_export_waits_for_another_process_and_uses_its_file(tmp_path, monkeypatch, exports_in_process):
    monkeypatch.setenv("EMBED_MODEL_CACHE", str(tmp_path / "cache"))
    exports: list[Path] = []
    monkeypatch.setattr(onnx_export, "export_fp32", lambda path, target: exports.append(target))
    monkeypatch.setattr(onnx_export, "LOCK_TIMEOUT", 0.2)
    path = embedding.model_path()
    target = onnx_export.onnx_file(path, MODEL)
    assert target.parent.is_dir()  # created on first use

    other = FileLock(f"{target}.lock")
    with other:  # another process is exporting
        with pytest.raises(Timeout):
            onnx_export.ensure_onnx(path, MODEL)
        target.write_bytes(b"what the other process exported")
    assert onnx_export.ensure_onnx(path, MODEL) == target
    assert exports == []
    assert target.read_bytes() == b"what the other process exported"


def test_a_failed_export_leaves_no_file_behind(tmp_path, monkeypatch, exports_in_process):
    monkeypatch.setenv("EMBED_MODEL_CACHE", str(tmp_path))

    def half_written(path: Path, target: Path) -> None:
        target.write_bytes(b"half a graph")
        raise RuntimeError("export failed")

    monkeypatch.setattr(onnx_export, "export_fp32", half_written)
    with pytest.raises(RuntimeError, match="export failed"):
        onnx_export.ensure_onnx(embedding.model_path(), MODEL)
    assert [path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")] == []


def test_an_export_removes_what_a_killed_exporter_left(tmp_path, monkeypatch, exports_in_process):
    monkeypatch.setenv("EMBED_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr(onnx_export, "export_fp32", lambda path, target: target.write_bytes(b"graph"))
    target = onnx_export.onnx_file(embedding.model_path(), MODEL)
    leftover = tmp_path / f".{target.name}.k1ll3d.tmp"
    leftover.write_bytes(b"half a graph")
    assert onnx_export.ensure_onnx(embedding.model_path(), MODEL).read_bytes() == b"graph"
    assert not leftover.exists()


def test_another_model_gets_files_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBED_MODEL_CACHE", str(tmp_path))
    packaged = embedding.model_path()
    retrained = tmp_path / "retrained"
    retrained.mkdir()
    (retrained / "config.json").write_text((packaged / "config.json").read_text())
    (retrained / "model.safetensors").write_bytes(b"other weights")
    assert onnx_export.onnx_file(packaged, MODEL) != onnx_export.onnx_file(retrained, MODEL)


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"^EMBED_BACKEND must be one of torch, onnx, got 'tensorflow'$"):
        Settings.from_env({"EMBED_BACKEND": "tensorflow"})
    assert Settings.from_env({"EMBED_BACKEND": "torch"}).embed_backend == "torch"


@pytest.mark.parametrize("process", ["web", "embedder"])
def test_the_withdrawn_int8_backend_stops_a_process_at_start_naming_the_valid_ones(process, tmp_path):
    env = procfile_env("redis://127.0.0.1:1/0", tmp_path, EMBED_BACKEND="onnx-int8", PORT=free_port())
    done = subprocess.run(
        ["bash", "-c", f"exec {procfile_command(process)}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    printed = (done.stdout + done.stderr).strip()
    expected = "configuration error: EMBED_BACKEND must be one of torch, onnx, got 'onnx-int8' (withdrawn"
    assert printed.splitlines()[-1].startswith(expected), printed
    assert "Traceback" not in printed, printed


def test_an_export_step_that_fails_in_its_child_says_why(tmp_path):
    with pytest.raises(RuntimeError, match=r"not_a_step failed(.|\n)*AttributeError"):
        onnx_export._in_child("not_a_step", tmp_path / "model", tmp_path / "graph.onnx")

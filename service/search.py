"""Semantic search in the web process: the model for queries and a FAISS replica of the index.

Both load once per web process: when the process starts (SEARCH_WARMUP=1: gunicorn lets the
process take requests only once they are loaded and the model has encoded once), else on the
first search. A background thread then keeps the replica close to the stream and writes
snapshots; each search still syncs first, for read-your-writes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis

from jobs.settings import Settings

if TYPE_CHECKING:
    from jobs.index.embedding import TextEncoder
    from jobs.index.replica import Replica

log = logging.getLogger(__name__)

# Seconds between background syncs of an idle replica.
FOLLOW_INTERVAL = 1.0


class SearchService:
    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self._connection = connection
        self._settings = settings
        self._encoder: TextEncoder | None = None
        self._replica: Replica | None = None
        self._loading = threading.Lock()
        self._loaded = threading.Event()
        self._follower: threading.Thread | None = None

    @property
    def status(self) -> str:
        return "ready" if self._replica is not None else "loading" if self._loading.locked() else "cold"

    @property
    def loaded_replica(self) -> Replica | None:
        return self._replica

    def _ensure_loaded(self) -> tuple[TextEncoder, Replica]:
        if self._replica is None or self._encoder is None:
            with self._loading:
                if self._replica is None or self._encoder is None:
                    from jobs.index.embedding import get_encoder
                    from jobs.index.replica import Replica

                    encoder = get_encoder()
                    # The first encode pays one-time costs (allocations, kernels): not a client's.
                    encoder.encode(["warm up"])
                    replica = Replica(self._connection, encoder.dimensions, self._settings.embed_threads)
                    replica.load()
                    self._encoder, self._replica = encoder, replica
                    self._loaded.set()
        return self._encoder, self._replica

    def search(
        self, query: str, k: int, where: dict[str, Any] | None, namespace: str | None = None
    ) -> list[tuple[str, float]]:
        """The k closest documents (stored ids, jobs.index.owners), in `namespace` if given."""
        encoder, replica = self._ensure_loaded()
        replica.sync()  # everything written before this search is visible to it
        vector = encoder.encode([query])[0]
        return replica.search(vector, k, where, namespace)

    def wait_loaded(self, timeout: float) -> bool:
        """Block until the model and replica are loaded (by `start_background`), or `timeout`."""
        return self._loaded.wait(timeout)

    def start_background(self) -> None:
        """Load now, in a thread, then follow the change stream and write snapshots."""
        if self._follower is None:
            self._follower = threading.Thread(target=self._follow, name="index-follower", daemon=True)
            self._follower.start()

    def _follow(self) -> None:
        backoff = 1.0
        while True:
            try:
                _, replica = self._ensure_loaded()
                replica.sync()
                if replica.changes_since_snapshot() >= self._settings.snapshot_every:
                    replica.write_snapshot()
                backoff = 1.0
                time.sleep(FOLLOW_INTERVAL)
            except redis.exceptions.RedisError as error:
                log.warning("index follower: Redis unavailable (%s); retrying in %.0f s", error, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30)
            except Exception:
                log.exception("index follower failed; retrying in %.0f s", backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30)

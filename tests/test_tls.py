"""rediss:// end to end: a TLS-only Redis with a self-signed certificate, like managed Redis."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from scripts.embedded_redis import free_port
from tests.support import WebService, base_env, start_workers, tls_capable_redis_server, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory) -> Iterator[str]:
    """A redis-server that speaks only TLS, with a certificate nobody signed."""
    directory = tmp_path_factory.mktemp("tls-redis")
    server = tls_capable_redis_server()
    if server is None:
        pytest.skip("needs a redis-server built with TLS (Debian's redis-server); the embedded one has none")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=redis.test",
         "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(directory / "cert.pem"),
         "--tls-key-file", str(directory / "key.pem"), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--logfile", "redis.log"],
        start_new_session=True,
    )  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        insecure = redis.Redis.from_url(url + "?ssl_cert_reqs=none&ssl_check_hostname=false")

        def up() -> bool:
            assert process.poll() is None, (directory / "redis.log").read_text()
            return insecure.info("server")["process_id"] == process.pid

        wait_until(up, what="the TLS Redis to answer")
        yield url
    finally:
        process.kill()
        process.wait()


def test_self_signed_rediss_works_when_opted_in(tls_redis, tmp_path: Path):
    env = base_env(tls_redis, tmp_path, REDIS_TLS_VERIFY=0, SEARCH_WARMUP=0)
    web = WebService(env, tmp_path)
    workers = start_workers(env, tmp_path, count=1)
    try:
        wait_until(lambda: requests.get(web.url("/readyz"), timeout=10).status_code == 200, what="readiness")
        job = web.post_job("log", {"message": "over TLS"}).json()
        assert web.wait_for_status(job["id"], {"finished"})["result"]["level"] == "info"
    finally:
        workers.kill()
        web.stop()


def test_an_unverifiable_certificate_is_refused_by_default(tls_redis, tmp_path: Path):
    web = WebService(base_env(tls_redis, tmp_path, SEARCH_WARMUP=0), tmp_path)
    try:
        response = requests.post(web.url("/jobs/log"), json={"message": "x"}, timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "redis_unavailable"
        assert "rediss" not in response.text and "certificate" not in response.text
        assert requests.get(web.url("/readyz"), timeout=30).status_code == 503
    finally:
        web.stop()

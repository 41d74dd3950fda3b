"""Completion webhooks: signed, retried, never to a private address that is not allowed."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs import callbacks
from jobs.callbacks import Allowed, CallbackRefused, parse_url, resolve
from tests.support import wait_until
from tests.test_security import make_app

SECRET = "test-callback-secret"  # tests/conftest.py gives the session's stack this one


# ------------------------------------------------------------------ a receiver


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers each POST with the next of `answers` (then 200)."""

    answers: list[int] = field(default_factory=list)
    delay: float = 0
    received: list[dict] = field(default_factory=list)

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers["Content-Length"]))
        self.received.append({"path": handler.path, "headers": dict(handler.headers), "body": body})
        time.sleep(self.delay)
        status = self.answers.pop(0) if self.answers else 200
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.handle(self)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def verify(delivery: dict, secret: str = SECRET) -> None:
    """What a receiver does: recompute the signature over `<timestamp>.<body>`, check the age."""
    headers = delivery["headers"]
    timestamp = headers["Afterward-Timestamp"]
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + delivery["body"], hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(headers["Afterward-Signature"], f"sha256={expected}")
    assert abs(time.time() - int(timestamp)) < 300


# ------------------------------------------------------------------ URLs and addresses


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/hook", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http:///hook", "no host"),
        ("https://user:secret@example.com/hook", "user name or password"),
        ("http://example.com:99999/", "not a valid URL"),
        ("https://example.com/" + "a" * 2048, "at most 2048"),
    ],
)
def test_urls_that_are_no_callback_urls(url, reason):
    with pytest.raises(CallbackRefused, match=reason):
        parse_url(url)


def test_the_parts_of_a_callback_url():
    target = parse_url("https://hooks.example.com:8443/done?source=afterward")
    assert (target.scheme, target.host, target.port, target.path) == (
        "https",
        "hooks.example.com",
        8443,
        "/done?source=afterward",
    )
    assert target.host_header == "hooks.example.com:8443"
    assert (
        parse_url("http://example.com").path == "/"
        and parse_url("http://example.com").host_header == "example.com"
    )


def resolving_to(monkeypatch, *addresses: str) -> None:
    """Make every name resolve to `addresses`, as a DNS server (or a rebinding attack) would."""

    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
    ],
)
def test_a_name_resolving_to_a_non_public_address_is_refused(monkeypatch, address):
    resolving_to(monkeypatch, address)
    with pytest.raises(CallbackRefused, match=f"resolves to {address}"):
        resolve(parse_url("https://hooks.example.com/"), Allowed.parse(()))


def test_one_private_address_among_public_ones_is_enough_to_refuse(monkeypatch):
    resolving_to(monkeypatch, "93.184.215.14", "10.0.0.7")
    with pytest.raises(CallbackRefused, match=r"10\.0\.0\.7"):
        resolve(parse_url("https://hooks.example.com/"), Allowed.parse(()))


def test_public_addresses_are_reached_at_the_address_that_was_checked(monkeypatch):
    resolving_to(monkeypatch, "93.184.215.14")
    assert resolve(parse_url("https://hooks.example.com/"), Allowed.parse(())) == "93.184.215.14"


@pytest.mark.parametrize("entry", ["hooks.internal", "HOOKS.internal.", "10.0.0.7", "10.0.0.0/8"])
def test_allowed_hosts_admit_a_name_an_address_or_a_network(monkeypatch, entry):
    resolving_to(monkeypatch, "10.0.0.7")
    assert resolve(parse_url("http://hooks.internal:8080/"), Allowed.parse([entry])) == "10.0.0.7"
    # ...and nothing else.
    with pytest.raises(CallbackRefused):
        resolve(parse_url("http://other.internal/"), Allowed.parse(["hooks.internal", "10.0.0.8"]))


def test_ipv4_mapped_ipv6_loopback_is_loopback():
    assert not Allowed.parse(()).admits("x", ipaddress.ip_address("::ffff:127.0.0.1"))
    assert not Allowed.parse(()).admits("x", ipaddress.ip_address("::1"))
    assert Allowed.parse(()).admits("x", ipaddress.ip_address("2606:4700::1111"))


def test_the_signature_is_an_hmac_of_timestamp_and_body():
    body = b'{"id":"x"}'
    delivery = {
        "headers": {
            "Afterward-Timestamp": str(int(time.time())),
            "Afterward-Signature": callbacks.signature(SECRET, str(int(time.time())), body),
        },
        "body": body,
    }
    verify(delivery)
    with pytest.raises(AssertionError):
        verify(delivery, secret="another secret")
    with pytest.raises(AssertionError):
        verify(dict(delivery, body=b'{"id":"y"}'))


# ------------------------------------------------------------------ the API (fakeredis)


def test_a_callback_needs_a_secret_on_the_server(fake_redis, tmp_path):
    client = make_app(tmp_path).test_client()
    answer = client.post("/jobs/log", json={"message": "hi", "callback_url": "https://example.com/hook"})
    assert answer.status_code == 422
    error = answer.get_json()["error"]
    assert error["code"] == "callbacks_disabled" and "CALLBACK_SECRET" in error["message"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://10.0.0.1/",
        "gopher://x/",
    ],
)
def test_a_private_or_odd_callback_url_is_refused_at_submit(fake_redis, tmp_path, url):
    client = make_app(tmp_path, callback_secret=SECRET).test_client()
    answer = client.post("/jobs/log", json={"message": "hi", "callback_url": url})
    assert answer.status_code == 422, answer.get_json()
    error = answer.get_json()["error"]
    assert error["code"] == "callback_url_refused"
    assert error["details"][0]["field"] == "callback_url"
    assert fake_redis.zcard("afterward:callbacks") == 0


def test_an_allowed_callback_shows_in_the_job_view(fake_redis, tmp_path):
    client = make_app(tmp_path, callback_secret=SECRET, callback_allowed_hosts=("127.0.0.1",)).test_client()
    answer = client.post("/jobs/log", json={"message": "hi", "callback_url": "http://127.0.0.1:9/hook"})
    assert answer.status_code == 202, answer.get_json()
    job_id = answer.get_json()["id"]
    expected = {
        "url": "http://127.0.0.1:9/hook",
        "status": "pending",
        "attempts": 0,
        "last_error": None,
        "delivered_at": None,
    }
    assert answer.get_json()["callback"] == expected
    assert client.get(f"/jobs/{job_id}").get_json()["callback"] == expected
    assert fake_redis.zscore("afterward:callbacks", job_id) is not None
    # A job without one says so.
    plain = client.post("/jobs/log", json={"message": "no hook"}).get_json()
    assert plain["callback"] is None


# ------------------------------------------------------------------ the real stack


@pytest.mark.integration
def test_a_finished_job_is_delivered_signed_after_a_failed_attempt(web, workers, receiver):
    hook, url = receiver
    hook.answers = [500]  # the first attempt fails
    workers(count=1)
    job_id = web.post_job("log", {"message": "tell me", "callback_url": f"{url}/done?k=1"}).json()["id"]
    view = wait_until(
        lambda: (v := web.job(job_id))["callback"]["status"] == "delivered" and v,
        what="the callback to be delivered",
    )
    assert view["status"] == "finished"
    assert view["callback"]["attempts"] == 2 and view["callback"]["last_error"] is None
    assert len(hook.received) == 2
    first, second = hook.received
    for delivery in hook.received:
        verify(delivery)
        assert delivery["path"] == "/done?k=1"
        assert delivery["headers"]["Content-Type"] == "application/json"
        assert delivery["headers"]["Afterward-Event"] == "job.finished"
    # Both attempts deliver the same end: a receiver deduplicates on this.
    assert first["headers"]["Afterward-Delivery"] == second["headers"]["Afterward-Delivery"]
    body = json.loads(second["body"])
    assert body["id"] == job_id and body["status"] == "finished"
    assert body["result"] == view["result"] and body["type"] == "log"


@pytest.mark.integration
def test_failed_stopped_and_canceled_jobs_are_delivered_too(web, workers, receiver):
    hook, url = receiver
    workers(count=1)
    failed = web.post_job("flaky", {"failures": 5, "callback_url": url}).json()["id"]
    running = web.post_job("hold", {"seconds": 60, "callback_url": url}).json()["id"]
    scheduled = web.post_job("log", {"message": "later", "delay": 600, "callback_url": url}).json()["id"]
    assert web.http.delete(web.url(f"/jobs/{scheduled}"), timeout=30).json()["status"] == "canceled"
    wait_until(lambda: web.job(running)["status"] == "started", what="the held job to start")
    assert web.http.delete(web.url(f"/jobs/{running}"), timeout=30).status_code in (200, 202)

    def events() -> dict[str, str]:
        return {json.loads(d["body"])["id"]: d["headers"]["Afterward-Event"] for d in hook.received}

    wait_until(lambda: len(events()) == 3, what="three deliveries")
    assert events() == {failed: "job.failed", running: "job.stopped", scheduled: "job.canceled"}
    for delivery in hook.received:
        verify(delivery)
    failed_body = next(json.loads(d["body"]) for d in hook.received if json.loads(d["body"])["id"] == failed)
    assert failed_body["error"]["message"]
    for job_id in (failed, running, scheduled):
        wait_until(
            lambda job_id=job_id: web.job(job_id)["callback"]["status"] == "delivered", what="delivered"
        )


@pytest.mark.integration
def test_a_slow_receiver_does_not_hold_up_the_worker(web, workers, receiver):
    hook, url = receiver
    hook.delay = 3
    workers(count=1)
    first = web.post_job("log", {"message": "slow hook", "callback_url": url}).json()["id"]
    second = web.post_job("log", {"message": "next job"}).json()["id"]
    view = web.wait_for_status(second, {"finished"})
    assert view["status"] == "finished"
    # The second job finished while the first one's callback was still being answered.
    assert web.job(first)["callback"]["status"] in ("pending", "delivered")
    assert len(hook.received) <= 1
    wait_until(lambda: web.job(first)["callback"]["status"] == "delivered", what="the slow delivery")


@pytest.mark.integration
def test_a_receiver_that_is_down_is_retried_then_given_up(web, workers, receiver, real_redis):
    hook, url = receiver
    hook.answers = [503, 503, 503, 503, 503, 503, 503, 503]
    # Give up 3 s after the job's end: attempts at about 0, 1, 3 s, then failed.
    workers(count=1, CALLBACK_RETRY_FOR="3")
    job_id = web.post_job("log", {"message": "nobody listens", "callback_url": url}).json()["id"]
    view = wait_until(
        lambda: (v := web.job(job_id))["callback"]["status"] == "failed" and v, what="giving up"
    )
    assert view["callback"]["attempts"] == len(hook.received) >= 2
    assert view["callback"]["last_error"] == "the receiver answered HTTP 503"
    assert real_redis.zscore("afterward:callbacks", job_id) is None


@pytest.mark.integration
def test_a_worker_killed_mid_delivery_leaves_it_to_another(web, workers, receiver, real_redis):
    """At least once: a delivery whose worker died is taken again once its lease runs out."""
    hook, url = receiver
    hook.delay = 30  # the first delivery hangs...
    first_worker = workers(count=1)
    job_id = web.post_job("log", {"message": "deliver me", "callback_url": url}).json()["id"]
    wait_until(lambda: len(hook.received) == 1, what="the first delivery to start")
    first_worker.kill()  # ...and its worker dies
    hook.delay = 0
    # The lease is still held: move it up rather than wait LEASE seconds.
    assert real_redis.zscore("afterward:callbacks", job_id) > time.time()
    real_redis.zadd("afterward:callbacks", {job_id: 0})
    workers(count=1)
    wait_until(
        lambda: web.job(job_id)["callback"]["status"] == "delivered", what="delivery by the new worker"
    )
    assert len(hook.received) == 2
    assert (
        hook.received[0]["headers"]["Afterward-Delivery"] == hook.received[1]["headers"]["Afterward-Delivery"]
    )


@pytest.mark.integration
def test_a_private_address_not_on_the_list_is_refused(web):
    # The stack allows 127.0.0.1 only (tests/conftest.py).
    for url in ("http://192.168.0.10/hook", "http://10.0.0.1/", "http://169.254.169.254/latest/meta-data"):
        answer = web.post_job("log", {"message": "x", "callback_url": url})
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "callback_url_refused", (
            answer.text
        )
    assert web.post_job("log", {"message": "x", "callback_url": "http://localhost:9/"}).status_code == 202


@pytest.mark.integration
def test_a_retried_job_delivers_its_new_end(web, workers, receiver):
    hook, url = receiver
    workers(count=1)
    job_id = web.post_job("flaky", {"failures": 1, "callback_url": url}).json()["id"]
    wait_until(lambda: web.job(job_id)["callback"]["status"] == "delivered", what="the failure's delivery")
    assert web.http.post(web.url(f"/jobs/{job_id}/retry"), timeout=30).status_code == 202
    wait_until(lambda: len(hook.received) == 2, what="the second end's delivery")
    events = [d["headers"]["Afterward-Event"] for d in hook.received]
    assert events == ["job.failed", "job.finished"]
    assert (
        hook.received[0]["headers"]["Afterward-Delivery"] != hook.received[1]["headers"]["Afterward-Delivery"]
    )
    wait_until(lambda: web.job(job_id)["callback"]["status"] == "delivered", what="delivered again")


def courier_for(receiver_url: str, **settings: object) -> tuple[callbacks.Courier, object]:
    import fakeredis
    from rq.job import JobStatus

    from jobs.engine.job import Job
    from jobs.settings import Settings

    connection = fakeredis.FakeRedis()
    courier = callbacks.Courier(
        connection, Settings(callback_secret=SECRET, callback_allowed_hosts=("127.0.0.1",), **settings)
    )
    job = Job("a" * 32, connection=connection)
    job._status = JobStatus.FINISHED
    return courier, job


def test_an_attempt_says_why_it_failed(receiver):
    hook, url = receiver
    courier, job = courier_for(url, callback_timeout=1)
    with pytest.raises(callbacks._Undelivered, match="connection refused"):
        courier.post("http://127.0.0.1:1/", b"{}", job, "end")
    hook.delay = 2
    with pytest.raises(callbacks._Undelivered, match="no answer within 1 s"):
        courier.post(url, b"{}", job, "end")
    hook.delay = 0
    hook.answers = [302]
    with pytest.raises(callbacks._Undelivered, match="answered HTTP 302"):  # redirects are not followed
        courier.post(url, b"{}", job, "end")
    courier.post(url, b'{"ok":1}', job, "end")
    assert hook.received[-1]["body"] == b'{"ok":1}'
    verify(hook.received[-1])


def test_an_end_announced_while_a_courier_looks_stays_due(fake_redis):
    """A courier that found the job running must not push back the "due now" its end just gave."""
    from rq.job import JobStatus

    from jobs.engine.job import Job
    from jobs.settings import Settings

    job = Job.create("jobs.types.log.write_log", kwargs={"message": "x"}, connection=fake_redis, id="b" * 32)
    job.set_status(JobStatus.STARTED, pipeline=None)
    job.save()
    with fake_redis.pipeline() as pipe:
        callbacks.register(pipe, job, "http://127.0.0.1:9/")
        pipe.execute()
    courier = callbacks.Courier(fake_redis, Settings(callback_secret=SECRET))
    fake_redis.zadd("afterward:callbacks", {job.id: 0})  # the job's end, announced meanwhile
    courier.deliver(job.id)  # ...by a courier that read the job while it still ran
    assert fake_redis.zscore("afterward:callbacks", job.id) == 0
    # Without an end in between, a running job is looked at again later, not at once.
    fake_redis.zadd("afterward:callbacks", {job.id: time.time() + callbacks.LEASE})
    courier.deliver(job.id)
    assert time.time() < fake_redis.zscore("afterward:callbacks", job.id) <= time.time() + callbacks.LEASE

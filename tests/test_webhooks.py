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

from jobs import callbacks, keys, webhook_sender
from jobs.callbacks import Allowed, CallbackRefused, parse_url, resolve
from service.security import PUBLIC, key_owner
from tests.support import ROOT, wait_until
from tests.test_security import KEY_A, KEY_B, make_app

SECRET = "test-callback-secret"  # tests/conftest.py gives the session's stack this one
# The session's stack has no API keys: every job's owner is `public`, signed with its secret.
PUBLIC_SECRET = callbacks.key_secret(SECRET, "public")


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


def verify(delivery: dict, secret: str = PUBLIC_SECRET) -> None:
    """What a receiver does: recompute the signature over timestamp, delivery id, event and
    body, a line break apart, and check the age."""
    headers = delivery["headers"]
    timestamp = headers["Afterward-Timestamp"]
    signed = (
        f"{timestamp}\n{headers['Afterward-Delivery']}\n{headers['Afterward-Event']}\n".encode()
        + delivery["body"]
    )
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
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
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
            if ":" in address
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
            for address in addresses
        ]

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
    with pytest.raises(
        CallbackRefused, match=r"hooks\.example\.com resolves to an address that is not public"
    ) as refused:
        resolve(parse_url("https://hooks.example.com/"), Allowed.parse(()))
    # The address goes to the log (CallbackRefused.address), never to the client.
    assert address not in str(refused.value) and refused.value.address == address


def test_one_private_address_among_public_ones_is_enough_to_refuse(monkeypatch):
    resolving_to(monkeypatch, "93.184.215.14", "10.0.0.7")
    with pytest.raises(CallbackRefused) as refused:
        resolve(parse_url("https://hooks.example.com/"), Allowed.parse(()))
    assert refused.value.address == "10.0.0.7" and "10.0.0.7" not in str(refused.value)


@pytest.mark.parametrize("host", ["a" * 64 + ".example.com", "hooks..example.com"])
def test_a_host_name_that_cannot_be_looked_up_is_refused(fake_redis, tmp_path, host):
    with pytest.raises(CallbackRefused, match="is not a valid host name"):
        resolve(parse_url(f"https://{host}/"), Allowed.parse(()))
    client = make_app(tmp_path, callback_secret=SECRET).test_client()
    answer = client.post("/jobs/log", json={"message": "hi", "callback_url": f"https://{host}/"})
    assert answer.status_code == 422 and answer.get_json()["error"]["code"] == "callback_url_refused"


def test_an_address_the_client_wrote_is_named_in_the_refusal():
    with pytest.raises(CallbackRefused, match=r"^10\.0\.0\.1 is not a public address"):
        resolve(parse_url("http://10.0.0.1/"), Allowed.parse(()))


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


# IPv6 forms that lead to an internal IPv4 address (127.0.0.1 in each), however Python's
# tables classify them.
REACHING_LOOPBACK = [
    "::127.0.0.1",  # IPv4-compatible, ::/96
    "64:ff9b::127.0.0.1",  # NAT64, well-known prefix: judged by the IPv4 address it carries
    "64:ff9b:1::7f00:1",  # NAT64, local-use prefix 64:ff9b:1::/48
    "64:ff9b:1:7f00:1::",
    "2002:7f00:1::",  # 6to4
    "::ffff:0:7f00:1",  # IPv4-translated, ::ffff:0:0:0/96
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1 (obfuscated)
]
# The same forms around a public IPv4 address: only NAT64's well-known prefix leads there the
# way a host behind DNS64 uses it; the others are refused as forms.
AROUND_A_PUBLIC_ADDRESS = {
    "64:ff9b::93.184.215.14": True,
    "::93.184.215.14": False,
    "64:ff9b:1::5db8:d70e": False,
    "2002:5db8:d70e::": False,
    "::ffff:0:5db8:d70e": False,
    "2001:0:4136:e378:8000:63bf:a247:28f1": False,
}


@pytest.mark.parametrize("address", REACHING_LOOPBACK)
def test_ipv6_forms_of_an_internal_ipv4_address_are_refused_at_delivery(monkeypatch, address):
    sender, job = sender_for("http://127.0.0.1/")
    # Written by the client...
    with pytest.raises(CallbackRefused, match="is not a public address"):
        sender.post(f"http://[{address}]:8080/hook", b"{}", job, "end")
    # ...or what a name resolves to.
    resolving_to(monkeypatch, address)
    with pytest.raises(CallbackRefused, match="resolves to an address that is not public"):
        sender.post("http://hooks.example.com/hook", b"{}", job, "end")
    # CALLBACK_ALLOWED_HOSTS admits it like any non-public address: by address, network or name.
    for entry in (address, f"{address}/128", "hooks.example.com"):
        assert resolve(parse_url("http://hooks.example.com/"), Allowed.parse([entry])) == str(
            ipaddress.ip_address(address)
        )


@pytest.mark.parametrize("address", REACHING_LOOPBACK)
def test_ipv6_forms_of_an_internal_ipv4_address_are_refused_at_submit(
    fake_redis, tmp_path, monkeypatch, address
):
    client = make_app(tmp_path, callback_secret=SECRET, callback_allowed_hosts=("127.0.0.1",)).test_client()
    for url in (f"http://[{address}]/hook", "http://hooks.example.com/hook"):
        resolving_to(monkeypatch, address)
        answer = client.post("/jobs/log", json={"message": "hi", "callback_url": url})
        assert answer.status_code == 422, answer.get_json()
        assert answer.get_json()["error"]["code"] == "callback_url_refused"
    assert fake_redis.zcard("afterward:callbacks") == 0


@pytest.mark.parametrize(("address", "public"), AROUND_A_PUBLIC_ADDRESS.items())
def test_ipv6_forms_of_a_public_ipv4_address(address, public):
    assert Allowed.parse(()).admits("x", ipaddress.ip_address(address)) is public


def test_the_signature_covers_timestamp_delivery_event_and_body():
    body = b'{"id":"x"}'
    timestamp = str(int(time.time()))
    headers = {
        "Afterward-Timestamp": timestamp,
        "Afterward-Delivery": "x.finished-1-1.000",
        "Afterward-Event": "job.finished",
    }
    headers["Afterward-Signature"] = callbacks.signature(
        PUBLIC_SECRET, timestamp, headers["Afterward-Delivery"], headers["Afterward-Event"], body
    )
    delivery = {"headers": headers, "body": body}
    verify(delivery)
    for changed in (
        {"Afterward-Event": "job.failed"},
        {"Afterward-Delivery": "x.finished-1-2.000"},
        # Moving the boundary between delivery id and event (both hold dots) breaks it too.
        {"Afterward-Delivery": "x.finished-1-1.000.job", "Afterward-Event": "finished"},
        {"Afterward-Timestamp": str(int(timestamp) - 1)},
    ):
        with pytest.raises(AssertionError):
            verify(dict(delivery, headers={**headers, **changed}))
    with pytest.raises(AssertionError):
        verify(dict(delivery, body=b'{"id":"y"}'))
    with pytest.raises(AssertionError):
        verify(delivery, secret=SECRET)


def test_each_owner_has_a_secret_of_its_own():
    a, b = key_owner(KEY_A), key_owner(KEY_B)
    secrets = {callbacks.key_secret(SECRET, owner) for owner in (a, b, PUBLIC)}
    assert len(secrets) == 3 and SECRET not in secrets
    assert callbacks.key_secret(SECRET, a) == callbacks.key_secret(SECRET, a)  # the same in every process
    assert callbacks.key_secret("another", a) != callbacks.key_secret(SECRET, a)


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


def test_each_key_reads_its_own_signing_secret(fake_redis, tmp_path):
    client = make_app(
        tmp_path, callback_secret=SECRET, api_keys=(KEY_A, KEY_B), rate_limit="off"
    ).test_client()
    answers = {}
    for key in (KEY_A, KEY_B):
        answer = client.get("/webhooks/secret", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200 and answer.headers["Cache-Control"] == "no-store"
        answers[key] = answer.get_json()
        assert answers[key] == {
            "owner": key_owner(key),
            "secret": callbacks.key_secret(SECRET, key_owner(key)),
        }
    assert answers[KEY_A]["secret"] != answers[KEY_B]["secret"]
    # Nothing lets key A ask for another owner's secret.
    asked = client.get(
        f"/webhooks/secret?owner={key_owner(KEY_B)}", headers={"Authorization": f"Bearer {KEY_A}"}
    )
    assert asked.get_json() == answers[KEY_A]
    refused = client.get("/webhooks/secret")
    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "unauthorized"


def test_the_open_api_has_one_secret_for_public(fake_redis, tmp_path):
    client = make_app(tmp_path, callback_secret=SECRET).test_client()
    answer = client.get("/webhooks/secret").get_json()
    assert answer == {"owner": PUBLIC, "secret": PUBLIC_SECRET}
    assert client.get("/webhooks/secret", headers={"Authorization": "Bearer any"}).get_json() == answer


def test_no_signing_secret_without_callback_secret(fake_redis, tmp_path):
    answer = make_app(tmp_path).test_client().get("/webhooks/secret")
    assert answer.status_code == 404
    error = answer.get_json()["error"]
    assert error["code"] == "callbacks_disabled" and "CALLBACK_SECRET is not set" in error["message"]


def test_the_signing_secret_is_rate_limited_like_the_api(fake_redis, tmp_path):
    client = make_app(
        tmp_path, callback_secret=SECRET, api_keys=(KEY_A,), rate_limit="2 per minute"
    ).test_client()
    headers = {"Authorization": f"Bearer {KEY_A}"}
    assert [client.get("/webhooks/secret", headers=headers).status_code for _ in range(2)] == [200, 200]
    answer = client.get("/webhooks/secret", headers=headers)
    assert answer.status_code == 429 and "Retry-After" in answer.headers
    # The key's other routes share its budget.
    assert client.get("/jobs", headers=headers).status_code == 429


@pytest.fixture
def hanging_dns(monkeypatch) -> Iterator[threading.Event]:
    """Name lookups that hang until the test lets them go (set the event); then they fail."""
    release = threading.Event()

    def getaddrinfo(host, *args, **kwargs):
        release.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield release
    release.set()
    wait_until(lambda: not resolver_threads(), what="the lookups to end")


def resolver_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "callback-resolve"]


def test_a_hanging_lookup_holds_a_submission_half_a_second_at_most(
    fake_redis, tmp_path, monkeypatch, hanging_dns
):
    client = make_app(tmp_path, callback_secret=SECRET).test_client()
    took, most_threads = [], 0
    for i in range(3 * callbacks.SUBMIT_RESOLVERS):
        started = time.monotonic()
        answer = client.post(
            "/jobs/log", json={"message": "hi", "callback_url": f"https://hooks-{i}.example.com/"}
        )
        took.append(time.monotonic() - started)
        assert answer.status_code == 202, answer.get_json()  # unchecked: every delivery checks it
        most_threads = max(most_threads, len(resolver_threads()))
    # The first SUBMIT_RESOLVERS wait out the bound; the rest find every lookup slot taken.
    assert max(took) < callbacks.SUBMIT_RESOLVE_SECONDS + 0.25, took
    assert sum(t >= callbacks.SUBMIT_RESOLVE_SECONDS for t in took) == callbacks.SUBMIT_RESOLVERS
    assert most_threads == callbacks.SUBMIT_RESOLVERS
    # Once the lookups end, their slots are free again: the next name is looked up, and refused.
    hanging_dns.set()
    wait_until(lambda: not resolver_threads(), what="the lookups to end")
    resolving_to(monkeypatch, "10.0.0.1")
    answer = client.post("/jobs/log", json={"message": "hi", "callback_url": "https://hooks.example.com/"})
    assert answer.status_code == 422


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


def sender_for(receiver_url: str, **settings: object) -> tuple[webhook_sender.WebhookSender, object]:
    import fakeredis
    from rq.job import JobStatus

    from jobs.engine.job import Job
    from jobs.settings import Settings

    connection = fakeredis.FakeRedis()
    sender = webhook_sender.WebhookSender(
        connection, Settings(callback_secret=SECRET, callback_allowed_hosts=("127.0.0.1",), **settings)
    )
    job = Job("a" * 32, connection=connection)
    job._status = JobStatus.FINISHED
    return sender, job


def test_an_attempt_says_why_it_failed(receiver):
    hook, url = receiver
    sender, job = sender_for(url, callback_timeout=1)
    with pytest.raises(webhook_sender._Undelivered, match="connection refused"):
        sender.post("http://127.0.0.1:1/", b"{}", job, "end")
    hook.delay = 2
    with pytest.raises(webhook_sender._Undelivered, match="no answer within 1 s"):
        sender.post(url, b"{}", job, "end")
    hook.delay = 0
    hook.answers = [302]
    with pytest.raises(webhook_sender._Undelivered, match="answered HTTP 302"):  # redirects are not followed
        sender.post(url, b"{}", job, "end")
    sender.post(url, b'{"ok":1}', job, "end")
    assert hook.received[-1]["body"] == b'{"ok":1}'
    verify(hook.received[-1])


def test_an_end_announced_while_a_sender_looks_stays_due(fake_redis):
    """A webhook sender that found the job running must not push back the "due now" its end just gave."""
    from rq.job import JobStatus

    from jobs.engine.job import Job
    from jobs.settings import Settings

    job = Job.create("jobs.types.log.write_log", kwargs={"message": "x"}, connection=fake_redis, id="b" * 32)
    job.set_status(JobStatus.STARTED, pipeline=None)
    job.save()
    with fake_redis.pipeline() as pipe:
        callbacks.register(pipe, job, "http://127.0.0.1:9/")
        pipe.execute()
    sender = webhook_sender.WebhookSender(fake_redis, Settings(callback_secret=SECRET))
    fake_redis.zadd("afterward:callbacks", {job.id: 0})  # the job's end, announced meanwhile
    sender.deliver(job.id)  # ...by a webhook sender that read the job while it still ran
    assert fake_redis.zscore("afterward:callbacks", job.id) == 0
    # Without an end in between, a running job is looked at again later, not at once.
    fake_redis.zadd("afterward:callbacks", {job.id: time.time() + webhook_sender.LEASE})
    sender.deliver(job.id)
    lease = time.time() + webhook_sender.LEASE
    assert time.time() < fake_redis.zscore("afterward:callbacks", job.id) <= lease


def finished_job(connection, job_id: str, url: str, owner: str | None = "public"):
    """A finished job with a callback, as the API and a worker leave it."""
    from rq.job import JobStatus

    from jobs.engine.job import Job
    from jobs.times import now

    job = Job.create(
        "jobs.types.log.write_log",
        kwargs={"message": "x"},
        connection=connection,
        id=job_id,
        meta={"owner": owner} if owner else {},
    )
    job.set_status(JobStatus.FINISHED, pipeline=None)
    job.ended_at = now()
    job.save()
    with connection.pipeline() as pipe:
        callbacks.register(pipe, job, url)
        pipe.execute()
    return job


def test_an_end_announced_anywhere_wakes_every_sender(fake_redis, receiver, monkeypatch):
    """A webhook sender delivers as soon as any process (a work-horse, the web process) announces an
    end, not at its next look: here its look comes only every 60 s."""
    import fakeredis

    from jobs.settings import Settings

    hook, url = receiver
    monkeypatch.setattr(webhook_sender, "POLL", 60)
    settings = Settings(callback_secret=SECRET, callback_allowed_hosts=("127.0.0.1",))
    senders = [
        webhook_sender.WebhookSender(
            fakeredis.FakeRedis(server=fake_redis.connection_pool.connection_kwargs["server"]), settings
        )
        for _ in range(2)
    ]
    for sender in senders:
        sender.start()
    try:
        # Both listen (each looks once as it starts listening, and finds nothing due).
        wait_until(lambda: fake_redis.pubsub_numsub(keys.CALLBACKS_CHANNEL)[0][1] == 2, what="listeners")
        time.sleep(0.2)
        job = finished_job(fake_redis, "c" * 32, url)
        started = time.monotonic()
        with fake_redis.pipeline() as pipe:
            callbacks.due(pipe, job)
            pipe.execute()
        wait_until(lambda: len(hook.received) == 1, timeout=10, what="the delivery")
        assert time.monotonic() - started < 10  # not the 60 s of a look
        verify(hook.received[0])
    finally:
        for sender in senders:
            sender.stop()


def test_an_end_announced_before_it_is_recorded_is_looked_at_again_soon(fake_redis):
    """RQ tells its exception handlers of an abandoned job (which announce its end) before it
    records the job as failed: the webhook sender that finds it still running looks again soon."""
    from concurrent.futures import ThreadPoolExecutor

    from rq.job import JobStatus

    from jobs.engine.job import Job
    from jobs.settings import Settings

    job = Job.create("jobs.types.log.write_log", kwargs={"message": "x"}, connection=fake_redis, id="d" * 32)
    job.set_status(JobStatus.STARTED, pipeline=None)
    job.save()
    with fake_redis.pipeline() as pipe:
        callbacks.register(pipe, job, "http://127.0.0.1:9/")
        callbacks.due(pipe, job)
        pipe.execute()
    sender = webhook_sender.WebhookSender(fake_redis, Settings(callback_secret=SECRET))
    sender._pool = ThreadPoolExecutor(1)
    try:
        assert sender.take_due() == 1
        sender._pool.shutdown(wait=True)
    finally:
        sender._pool.shutdown(wait=True)
    assert fake_redis.zscore(keys.CALLBACKS, job.id) <= time.time() + webhook_sender.ANNOUNCED_RECHECK
    # Once: the next look finds an entry that was not announced, and waits as for any running job.
    sender._pool = ThreadPoolExecutor(1)
    fake_redis.zadd(keys.CALLBACKS, {job.id: time.time() - 1})
    assert sender.take_due() == 1
    sender._pool.shutdown(wait=True)
    assert fake_redis.zscore(keys.CALLBACKS, job.id) >= time.time() + callbacks.RECHECK_MIN - 1


def test_a_redis_error_while_taking_frees_the_senders_threads(fake_redis):
    import redis

    from jobs.settings import Settings

    settings = Settings(callback_secret=SECRET, callback_concurrency=3)
    sender = webhook_sender.WebhookSender(fake_redis, settings)

    def broken(*args, **kwargs):
        raise redis.ConnectionError("Redis went away")

    sender._take = broken
    with pytest.raises(redis.ConnectionError):
        sender.take_due()
    assert all(sender._busy.acquire(blocking=False) for _ in range(3))


def test_a_job_submitted_before_per_key_secrets_is_delivered_signed_with_its_owners(fake_redis, receiver):
    """A job whose callback state was written before secrets were per key (no `end` in it) is
    delivered, signed with the secret its owner reads at GET /webhooks/secret."""
    from jobs.settings import Settings

    hook, url = receiver
    owner = key_owner(KEY_A)
    job = finished_job(fake_redis, "e" * 32, url, owner=owner)
    fake_redis.hset(job.key, "afterward_callback", json.dumps(callbacks.initial_state(url)))
    sender = webhook_sender.WebhookSender(
        fake_redis, Settings(callback_secret=SECRET, callback_allowed_hosts=("127.0.0.1",))
    )
    sender.deliver(job.id)
    assert len(hook.received) == 1
    verify(hook.received[0], callbacks.key_secret(SECRET, owner))
    for other in (PUBLIC_SECRET, callbacks.key_secret(SECRET, key_owner(KEY_B)), SECRET):
        with pytest.raises(AssertionError):
            verify(hook.received[0], other)


# ------------------------------------------------------------------ keys, and the README's receiver


@pytest.fixture
def keyed_web(env, proc_dir) -> Iterator:
    from tests.support import WebService

    web = WebService(dict(env, API_KEYS=f"{KEY_A},{KEY_B}", RATE_LIMIT="off"), proc_dir)
    yield web
    web.stop()


@pytest.mark.integration
def test_a_keys_deliveries_verify_with_its_secret_only(keyed_web, workers, receiver):
    hook, url = receiver
    workers(count=1)
    a, b = ({"Authorization": f"Bearer {key}"} for key in (KEY_A, KEY_B))
    secret_a = keyed_web.http.get(keyed_web.url("/webhooks/secret"), headers=a, timeout=30).json()["secret"]
    secret_b = keyed_web.http.get(keyed_web.url("/webhooks/secret"), headers=b, timeout=30).json()["secret"]
    answer = keyed_web.post_job("log", {"message": "mine", "callback_url": url}, headers=a)
    assert answer.status_code == 202, answer.text
    wait_until(lambda: len(hook.received) == 1, what="the delivery")
    delivery = hook.received[0]
    verify(delivery, secret_a)
    for other in (secret_b, SECRET, PUBLIC_SECRET):
        with pytest.raises(AssertionError):
            verify(delivery, other)


def readme_receiver() -> str:
    """The receiver example in docs/api.md's "Completion webhooks" section, as printed."""
    readme = (ROOT / "docs" / "api.md").read_text()
    section = readme.split("### Completion webhooks", 1)[1].split("\n### ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.integration
def test_the_readme_receiver_accepts_a_real_delivery_once_and_nothing_forged(web, workers, receiver):
    hook, url = receiver
    workers(count=1)
    secret = web.http.get(web.url("/webhooks/secret"), timeout=30).json()["secret"]
    job_id = web.post_job("log", {"message": "tell me", "callback_url": url}).json()["id"]
    wait_until(lambda: len(hook.received) == 1, what="the delivery")
    headers, body = hook.received[0]["headers"], hook.received[0]["body"]

    example: dict = {}
    exec(compile(readme_receiver(), "docs/api.md", "exec"), example)
    handled = []
    example["handle"] = lambda event, view: handled.append((event, view["id"], view["status"]))

    def receive(headers: dict, body: bytes = body, secret: str = secret) -> int:
        return example["receive"](headers, body, secret)

    assert receive(headers) == 200
    assert handled == [("job.finished", job_id, "finished")]
    assert receive(headers) == 200 and len(handled) == 1  # a second delivery of one end: once
    # Forged, tampered with, or too old: refused, and not handled.
    assert receive(headers, secret=SECRET) == 401
    assert receive(headers, body=body.replace(b"finished", b"failed")) == 401
    assert receive({**headers, "Afterward-Event": "job.failed"}) == 401
    assert receive({**headers, "Afterward-Delivery": headers["Afterward-Delivery"] + "x"}) == 401
    old = str(int(headers["Afterward-Timestamp"]) - example["REPLAY_WINDOW"] - 5)
    resigned = callbacks.signature(
        secret, old, headers["Afterward-Delivery"], headers["Afterward-Event"], body
    )
    assert receive({**headers, "Afterward-Timestamp": old, "Afterward-Signature": resigned}) == 401
    assert len(handled) == 1


def test_a_sender_listens_again_after_losing_redis(fake_redis, receiver, monkeypatch):
    import redis

    from jobs.settings import Settings

    hook, url = receiver
    monkeypatch.setattr(webhook_sender, "POLL", 60)
    monkeypatch.setattr(webhook_sender, "RECONNECT", 0.1)
    sender = webhook_sender.WebhookSender(
        fake_redis, Settings(callback_secret=SECRET, callback_allowed_hosts=("127.0.0.1",))
    )
    pubsub, failures = fake_redis.pubsub, []

    def flaky_pubsub(**kwargs):
        if not failures:
            failures.append(1)
            raise redis.ConnectionError("Redis went away")
        return pubsub(**kwargs)

    monkeypatch.setattr(fake_redis, "pubsub", flaky_pubsub)
    sender.start()
    try:
        wait_until(
            lambda: fake_redis.pubsub_numsub(keys.CALLBACKS_CHANNEL)[0][1] == 1, what="listening again"
        )
        time.sleep(0.2)  # its first look, on listening, is over
        job = finished_job(fake_redis, "f" * 32, url)
        with fake_redis.pipeline() as pipe:
            callbacks.due(pipe, job)
            pipe.execute()
        wait_until(lambda: len(hook.received) == 1, timeout=10, what="the delivery")
    finally:
        sender.stop()
    assert failures == [1]

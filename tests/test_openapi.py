"""/openapi.json describes every route from the validating schemas; schemathesis holds us to it."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service import create_app
from tests.test_index import CountingEncoder


@pytest.fixture
def spec_app(fake_redis, tmp_path, monkeypatch):
    # Searches answer from the stand-in encoder: the spec is about shapes, not meaning, and
    # the real model would load inside pytest.
    monkeypatch.setattr("jobs.index.embedding.get_encoder", CountingEncoder)
    return create_app({"search_warmup": 0, "log_file": str(tmp_path / "jobs.log")})


@pytest.fixture
def api_schema(spec_app):
    return schemathesis.openapi.from_wsgi("/openapi.json", spec_app)


def test_spec_covers_every_route_and_job_type(spec_app):
    spec = spec_app.test_client().get("/openapi.json").get_json()
    assert spec["openapi"] == "3.1.0"
    documented = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    for rule in spec_app.url_map.iter_rules():
        if rule.endpoint.startswith(("rq_dashboard", "swagger_ui", "static", "openapi", "favicon")):
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if path == "/jobs/{type_name}":
                assert all((f"/jobs/{name}", "POST") in documented for name in ("log", "sleep", "embed"))
            else:
                assert (path, method) in documented, (path, method)


def test_request_schemas_are_the_validating_models(spec_app):
    spec = spec_app.test_client().get("/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    sleep = schemas["SleepRequest"]
    assert sleep["properties"]["seconds"]["exclusiveMinimum"] == 0
    assert sleep["properties"]["queue"]["enum"] == ["high", "default", "low"]
    assert sleep["properties"]["retries"]["maximum"] == 10
    assert sleep["additionalProperties"] is False
    assert "seconds" in sleep["required"]
    assert schemas["EmbedRequest"]["properties"]["documents"]["minItems"] == 1
    assert spec["paths"]["/jobs/sleep"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SleepRequest"
    }


def test_docs_page_is_served_offline(spec_app):
    client = spec_app.test_client()
    page = client.get("/docs/")
    assert page.status_code == 200
    assert "/openapi.json" in page.get_data(as_text=True)
    bundle = client.get("/docs/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    bundle.close()


def test_every_answer_matches_the_spec(api_schema):
    """Hypothesis-generated requests for every operation: no 5xx, every answer as documented."""
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:
        # /readyz answers a documented 503 while search warms up or Redis is unreachable.
        check(operation, checks[1:] if operation.path == "/readyz" else checks)


def check(operation, checks) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        case.call_and_validate(checks=checks)

    run()


def test_pause_and_resume_are_documented_with_examples(spec_app):
    spec = spec_app.test_client().get("/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    assert {"paused", "paused_at"} <= set(schemas["QueueInfo"]["required"])
    for action, paused in (("pause", True), ("resume", False)):
        operation = spec["paths"][f"/queues/{{name}}/{action}"]["post"]
        assert {"200", "403", "404"} <= set(operation["responses"])
        assert operation["parameters"][0]["schema"]["enum"] == [
            "high", "default", "low", "embed-high", "embed-default", "embed-low"
        ]  # fmt: skip
        example = operation["responses"]["200"]["content"]["application/json"]["example"]
        assert set(example) == set(schemas["QueueState"]["properties"]) and example["paused"] is paused
        answer = spec_app.test_client().post(f"/queues/low/{action}").get_json()
        assert set(answer) == set(example) and answer["paused"] is paused

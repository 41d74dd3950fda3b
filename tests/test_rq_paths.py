"""bench.costs' override measurement: a swapped override really runs RQ's code, and the round
trips of each path are counted where they are spent."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.costs import path_costs, read_path_stats
from bench.rtt_proxy import RttProxy
from scripts import stack

pytestmark = pytest.mark.integration

JOBS = 25  # the first 10 are not counted


def test_each_swapped_override_costs_its_path_the_round_trips_rqs_code_spends(
    test_db: stack.TestDatabase, tmp_path: Path
):
    target = urlsplit(test_db.url)
    with RttProxy(target.port or 6379, target_host=target.hostname or "127.0.0.1") as proxy:
        measured = {
            swap: read_path_stats([path_costs(test_db.base_url, tmp_path, proxy, JOBS, swap, 0)])
            for swap in ("", "start", "finish", "set_state")
        }
    ours = measured[""]
    # The engine starts a job in one round trip and records its success in one transaction.
    assert ours["start RTs"] == 1 and ours["finish RTs"] == 1, ours
    # RQ's code: prepare_execution and prepare_job_execution; handle_job_success and more.
    assert measured["start"]["start RTs"] == 2, measured["start"]
    assert measured["finish"]["finish RTs"] > 1, measured["finish"]
    # RQ writes the worker's state at every call, changed or not.
    assert measured["set_state"]["take RTs"] > ours["take RTs"], measured["set_state"]
    # Each swap leaves the other paths as they are.
    assert measured["start"]["finish RTs"] == 1 and measured["finish"]["start RTs"] == 1

"""Every place the engine leans on RQ beyond its documented hooks still holds on this RQ."""

from __future__ import annotations

import rq

from jobs.engine import rq_touchpoints


def test_every_rq_touchpoint_holds():
    broken = rq_touchpoints.broken()
    assert not broken, f"RQ {rq.__version__} changed under the engine:\n" + "\n".join(
        f"- {touchpoint.name}: {touchpoint.why}" for touchpoint in broken
    )


def test_a_touchpoint_that_no_longer_holds_is_named(monkeypatch):
    # A stand-in for an RQ release that renames a parameter the engine relies on.
    def renamed(self, job, remove_from_queue=False): ...

    monkeypatch.setattr(rq.worker.base.BaseWorker, "prepare_job_execution", renamed)
    names = [touchpoint.name for touchpoint in rq_touchpoints.broken()]
    assert names == ["Worker.prepare_job_execution(job, remove_from_intermediate_queue)"]

"""Clients the web process shares across requests, kept in `app.extensions`."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from flask import Flask, current_app

from jobs.connection import connect
from jobs.engine.queue import Queue
from jobs.families import EMBED, GENERAL, family_queues
from jobs.replication import pinnable
from jobs.settings import Settings
from jobs.types.registry import JobType, job_types
from service.search import SearchService
from service.waiting import JobWaiter

EXTENSION = "afterward"


@dataclass
class AppState:
    settings: Settings
    redis: redis.Redis
    queues: dict[str, Queue]
    job_types: dict[str, JobType]
    waiter: JobWaiter = field(repr=False)
    search: SearchService = field(repr=False)


def connect_redis(settings: Settings) -> redis.Redis:
    """The web process's client: fails fast when Redis is unreachable (the API answers 503)."""
    return connect(settings, role="web")


def init_state(app: Flask, settings: Settings) -> AppState:
    connection = connect_redis(settings)
    if settings.redis_min_replicas:
        # A request that acknowledges writes holds one connection for its WAIT (service.replication).
        connection = pinnable(connection)
    state = AppState(
        settings=settings,
        redis=connection,
        queues={
            name: Queue(name, connection=connection)
            for family in (GENERAL, EMBED)
            for name in family_queues(family)
        },
        job_types=dict(job_types(settings.extra_job_modules)),
        waiter=JobWaiter(connection, slots=settings.waiting_slots),
        search=SearchService(connection, settings),
    )
    app.extensions[EXTENSION] = state
    return state


def get_state() -> AppState:
    return current_app.extensions[EXTENSION]

"""The engine: how jobs are taken from Redis, run in work-horses, ended and recovered, on RQ."""

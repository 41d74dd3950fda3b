"""Stock RQ's command line with the benchmarks' job module imported first, as RQ's docs advise.

    .venv/bin/python -m bench.stock_worker worker-pool default --num-workers 2

RQ forks a work-horse for every job; what the worker imported before it forked, each horse
has for free ("Performance notes" in RQ's documentation: preload your libraries). This
imports the `log` job's module, then runs RQ's own `rq` command, unchanged.
"""

import sys

from rq.cli import main

import jobs.types.log  # noqa: F401 - the preload

if __name__ == "__main__":
    sys.exit(main())

"""Settings module for the `rq` command line (`--config jobs.rq_settings` in the Procfile).

The rq CLI connects with REDIS_URL as it stands; this adds the TLS options of REDIS_TLS_VERIFY,
and makes its logs structured like the web process's.
"""

from jobs.logs import DICT_CONFIG as DICT_CONFIG  # one JSON event per line
from jobs.settings import get_settings

REDIS_URL = get_settings().redis_client_url

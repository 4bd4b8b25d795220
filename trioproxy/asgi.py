"""`hypercorn -k trio 'trioproxy.asgi:app'`: configured from TRIOPROXY_CONFIG and TRIOPROXY_*.

hypercorn sets up its own loggers only: without a handler on the root logger the turn lines
(INFO) would go nowhere, so the proxy's logging is configured as `serve` does it, from
TRIOPROXY_LOG_LEVEL and TRIOPROXY_LOG_FORMAT, unless the host program configured logging.
"""

import logging
import os

from trioproxy import logs, managed
from trioproxy.app import create_app
from trioproxy.config import Settings

if not logging.getLogger().handlers:
    logs.configure(
        os.environ.get("TRIOPROXY_LOG_LEVEL", "INFO"),
        os.environ.get("TRIOPROXY_LOG_FORMAT", "json"),
    )
_server, _managed = managed.load(os.environ.get("TRIOPROXY_CONFIG"))
app = create_app(Settings.from_env(base=_server), managed=_managed)

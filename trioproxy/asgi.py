"""`hypercorn -k trio 'trioproxy.asgi:app'`: configured from TRIOPROXY_CONFIG and TRIOPROXY_*."""

import os

from trioproxy import managed
from trioproxy.app import create_app
from trioproxy.config import Settings

_server, _managed = managed.load(os.environ.get("TRIOPROXY_CONFIG"))
app = create_app(Settings.from_env(base=_server), managed=_managed)

"""`hypercorn -k trio 'trioproxy.asgi:app'`: the app configured from `TRIOPROXY_*` variables."""

from trioproxy.app import create_app

app = create_app()

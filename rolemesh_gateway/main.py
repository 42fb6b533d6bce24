"""The ASGI entry point of the guide: ``uvicorn rolemesh_gateway.main:app``.

The config named by ``ROLE_MESH_CONFIG`` is read and validated at import, so a bad file stops
uvicorn before it listens, with one line that says what is wrong.
"""

from __future__ import annotations

import os
import sys

from .common.errors import ConfigError
from .common.logs import setup_logging
from .gateway.app import Gateway, create_app
from .gateway.settings import load_settings


def _build() -> Gateway:
    setup_logging()
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"rolemesh-gateway: config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if settings.tls.serving:
        print(
            "rolemesh-gateway: warning: tls.cert_file is served by 'rolemesh-gateway' only; a bare "
            "uvicorn serves HTTPS with its own --ssl-certfile/--ssl-keyfile, without certificate "
            "identity for nodes",
            file=sys.stderr,
            flush=True,
        )
    # The CLI's --access-log, for the guide's bare uvicorn command (whose own access log says less).
    access = os.environ.get("ROLE_MESH_ACCESS_LOG", "").lower() in ("1", "true", "yes")
    return create_app(settings, access_log=access, config_path=os.environ.get("ROLE_MESH_CONFIG"))


app = _build()

"""The gateway program: settings, routes, registry and the ASGI app (``rolemesh-gateway``)."""

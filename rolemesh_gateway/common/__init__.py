"""What both programs share: wire protocol, HTTP client and relay, ASGI helpers, config pipeline.

Rule (tested): modules here import only each other, never :mod:`rolemesh_gateway.gateway` or
:mod:`rolemesh_gateway.agent`.
"""

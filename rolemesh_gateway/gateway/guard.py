"""Who may call what: client keys for inference and status, node keys for the node API, admin
keys (when there are any; else client keys) for operator endpoints.

A client key never works as a node key, nor the reverse (the settings refuse a key in both
lists). With no key of either kind configured the gateway is open (a loud warning at start);
with node keys only, client calls are refused.
"""

from __future__ import annotations

from ..common.asgi import Headers
from ..common.auth import KeyRing, key_id
from ..common.errors import Forbidden, Unauthorized
from .settings import AuthSettings, ClientKey


class Guard:
    """The gateway's key rings and the checks built on them."""

    def __init__(self, auth: AuthSettings) -> None:
        self.clients = KeyRing(auth.client_api_keys)
        self.nodes = KeyRing(auth.node_api_keys)
        self.admins = KeyRing(auth.admin_api_keys)
        #: No keys at all: anyone may call anything.
        self.open = not self.clients and not self.nodes
        #: Client keys limited to some models: never operator keys (they would see every alias).
        self._restricted = frozenset(
            key_id(k.key) for k in auth.client_api_keys if isinstance(k, ClientKey) and k.models is not None
        )

    def client(self, headers: Headers) -> str | None:
        """The id of the client key presented (None in open mode); 401 without a valid one."""
        if self.open:
            return None
        return self.clients.check_client(headers)

    def admin(self, headers: Headers) -> str | None:
        """Operator endpoints: an admin key when admin keys are configured, else a client key."""
        if self.admins:
            return self.admins.check_client(headers)
        kid = self.client(headers)
        if kid in self._restricted:
            raise Forbidden(
                "this client key may use only some models (its models list), so it is no operator "
                "key; use an admin key (auth.admin_api_keys) or a client key without models"
            )
        return kid

    def is_admin(self, headers: Headers) -> bool:
        """May the caller use operator endpoints? Never raises."""
        try:
            self.admin(headers)
        except (Unauthorized, Forbidden):
            return False
        return True

    def is_client(self, headers: Headers) -> bool:
        """Does the caller present a valid client key (or is the gateway open)? Never raises."""
        try:
            self.client(headers)
        except Unauthorized:
            return False
        return True

    def node(self, headers: Headers) -> str | None:
        """The id of the node key presented (None in open mode); 401 without a valid one."""
        if self.open:
            return None
        if not self.nodes:
            raise Unauthorized("node registration is disabled: configure auth.node_api_keys")
        kid = self.nodes.check_node(headers)
        if kid is None:
            raise Unauthorized("missing or invalid node key (X-RoleMesh-Node-Key)")
        return kid

"""TLS for both programs: the ``tls:`` config section, the SSL contexts it makes, peer names.

One section, the same in the gateway's and the agent's config, for both directions:

- serving: ``cert_file`` and ``key_file`` make the program listen with HTTPS;
  ``client_ca_file`` asks every client for a certificate signed by that CA (mutual TLS), and
  ``client_certs`` says whether one must be given (``required``) or only checked when given
  (``optional``: the gateway's inference clients may come without one, its nodes with one);
- calling out (the agent calling the gateway, the gateway calling nodes and https upstreams):
  ``ca_file`` is the CA that the other side's certificate must chain to (instead of the
  system's trust store), and ``client_cert_file`` / ``client_key_file`` the certificate to
  present to a server that asks for one.

Relative paths are taken from the working directory. Every file is loaded when the config is
validated, so a missing file, a key that does not match its certificate or a file that is not
PEM is one config error before anything listens. On a reload (SIGHUP) the serving context is
loaded again in place: new connections get the new certificate, connections already open keep
theirs (:func:`reload_server_context`).

Node identity: :func:`cert_names` is what a certificate names (its DNS subjectAltNames and its
subject CN); the gateway checks a registering node's ``node_id`` against it.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .config import Closed
from .http1 import tls_reason as reason

Path = Annotated[str, Field(min_length=1)]


class TlsSettings(Closed):
    """The ``tls:`` section of both programs (all optional; nothing set: plain HTTP)."""

    #: Serve HTTPS with this certificate (PEM; the chain may follow it) and its key.
    cert_file: Path | None = None
    #: The key of ``cert_file`` (unset: the key is in ``cert_file``).
    key_file: Path | None = None
    #: Ask clients for a certificate signed by this CA (mutual TLS).
    client_ca_file: Path | None = None
    #: With ``client_ca_file``: ``required`` refuses a client without a certificate at the
    #: handshake; ``optional`` lets it in (a certificate that is given must still be valid).
    client_certs: Literal["required", "optional"] = "required"
    #: Verify the servers this program calls against this CA instead of the system's store.
    ca_file: Path | None = None
    #: The certificate (and key) to present to servers that ask for one.
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if self.cert_file is None:
            for name in ("key_file", "client_ca_file"):
                if getattr(self, name) is not None:
                    raise ValueError(f"tls.{name} needs tls.cert_file (the server certificate)")
        if self.client_key_file is not None and self.client_cert_file is None:
            raise ValueError("tls.client_key_file needs tls.client_cert_file")
        # Load everything once now: a bad file is a config error, not a failure at the first call.
        server_context(self)
        client_context(self)
        return self

    @property
    def serving(self) -> bool:
        return self.cert_file is not None

    def summary(self) -> str:
        """One line for ``validate``: what is served and checked, or that nothing is."""
        if self.cert_file is None:
            served = "plain HTTP"
        elif self.client_ca_file is None:
            served = "HTTPS"
        else:
            served = f"HTTPS, client certificates {self.client_certs} (CA {self.client_ca_file})"
        out = f"CA {self.ca_file}" if self.ca_file else "the system's CAs"
        cert = f", presenting {self.client_cert_file}" if self.client_cert_file else ""
        return f"tls: serves {served}; calls out trusting {out}{cert}"

    @property
    def mutual(self) -> bool:
        """Clients are asked for a certificate."""
        return self.client_ca_file is not None


#: The ``tls:`` keys that command-line options and environment variables can set.
FILE_KEYS = ("cert_file", "key_file", "client_ca_file", "ca_file", "client_cert_file", "client_key_file")


def env_name(prefix: str, key: str) -> str:
    """``ROLE_MESH_TLS_CERT_FILE`` (gateway) / ``ROLE_MESH_AGENT_TLS_CERT_FILE`` (agent) ..."""
    return f"{prefix}_TLS_{key.upper()}"


def apply_env(data: dict[str, Any], env: Mapping[str, str], prefix: str) -> None:
    """Set the file's ``tls:`` keys from their environment variables (which win), in place."""
    given = {key: env[env_name(prefix, key)] for key in FILE_KEYS if env.get(env_name(prefix, key))}
    if given:
        section = data.get("tls")
        data["tls"] = {**(section if isinstance(section, dict) else {}), **given}


def _load(what: str, path: str, load: Any) -> None:
    try:
        load()
    except FileNotFoundError:
        raise ValueError(f"tls.{what}: {path!r} does not exist") from None
    except PermissionError:
        raise ValueError(f"tls.{what}: {path!r} cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise ValueError(f"tls.{what}: {path!r} is a directory, not a PEM file") from None
    except ssl.SSLError as exc:
        raise ValueError(f"tls.{what}: {path!r} cannot be used: {reason(exc)}") from None
    except _Encrypted:
        raise ValueError(
            f"tls.{what}: {path!r} holds an encrypted key; give the key unencrypted, in a file "
            "only this program's user can read"
        ) from None


class _Encrypted(Exception):
    pass


def _no_password() -> str:
    """Never prompt on the terminal for a key's passphrase (a service has none to ask)."""
    raise _Encrypted


def _load_server(ctx: ssl.SSLContext, tls: TlsSettings) -> None:
    assert tls.cert_file is not None
    cert, key = tls.cert_file, tls.key_file
    _load(
        "cert_file" if key is None else "cert_file/key_file",
        cert if key is None else f"{cert}, {key}",
        lambda: ctx.load_cert_chain(cert, key, password=_no_password),
    )
    if tls.client_ca_file is not None:
        ca = tls.client_ca_file
        _load("client_ca_file", ca, lambda: ctx.load_verify_locations(cafile=ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_certs == "required" else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The context to listen with (None: plain HTTP). TLS 1.2 at least; HTTP/1.1 only."""
    if tls.cert_file is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    _load_server(ctx, tls)
    return ctx


def reload_server_context(ctx: ssl.SSLContext, tls: TlsSettings) -> None:
    """Load ``tls``'s files into the listening context ``ctx`` (SIGHUP): new handshakes use them.

    The certificate and key are replaced, and ``client_certs`` applies anew. CA certificates
    can only be added to a context: a CA taken out of ``client_ca_file`` stays trusted until
    the program restarts. Raises ValueError (a one-line reason) and leaves ``ctx`` usable.
    """
    # Load into a scratch context first: a bad file must not leave the live one half-changed.
    server_context(tls)
    _load_server(ctx, tls)


def reload_tls(ctx: ssl.SSLContext | None, tls: TlsSettings) -> str | None:
    """On a reload, load the serving files again into ``ctx``; the reason if that cannot be."""
    if (ctx is not None) != tls.serving:
        return "tls.cert_file: turning HTTPS on or off needs a restart"
    if ctx is not None:
        try:
            reload_server_context(ctx, tls)
        except ValueError as exc:
            return str(exc)
    return None


def client_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The context for https calls (None: the system's store and no client certificate)."""
    if tls.ca_file is None and tls.client_cert_file is None:
        return None
    if tls.ca_file is None:
        ctx = ssl.create_default_context()
    else:
        # Only this CA: a private CA replaces the public ones rather than joining them.
        ca = tls.ca_file
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _load("ca_file", ca, lambda: ctx.load_verify_locations(cafile=ca))
    if tls.client_cert_file is not None:
        cert, key = tls.client_cert_file, tls.client_key_file
        _load(
            "client_cert_file" if key is None else "client_cert_file/client_key_file",
            cert if key is None else f"{cert}, {key}",
            lambda: ctx.load_cert_chain(cert, key, password=_no_password),
        )
    return ctx


def cert_names(cert: dict[str, Any] | None) -> tuple[str, ...]:
    """What a (verified) peer certificate names: its DNS subjectAltNames, then its subject CN."""
    if not cert:
        return ()
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value not in names:
                names.append(value)
    return tuple(names)


def tls_extension(ssl_object: Any) -> dict[str, Any]:
    """The ASGI ``tls`` extension for a connection (once per connection, shared by its requests).

    ``client_cert_name`` is the subject as RFC 4514 text (``CN=gpu-box-1``), as the ASGI TLS
    extension specifies; ``client_cert_names`` (ours) is :func:`cert_names`.
    """
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    der = ssl_object.getpeercert(binary_form=True) if cert else None
    name = None
    if cert:
        name = ",".join(
            "+".join(f"{_RFC4514.get(k, k)}={v}" for k, v in rdn) for rdn in reversed(cert.get("subject", ()))
        )
    cipher = ssl_object.cipher() if ssl_object is not None else None
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
        "cipher": cipher[0] if cipher else None,
        "client_cert_names": cert_names(cert),
    }


_RFC4514 = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
}

"""How a client trusts a master over TLS: the cluster CA alone (a file, the client file's
`ca`), and what to say when a master's certificate does not pass.

A certificate that does not pass is a setting to fix, not a master down: the call stops
there, saying which CA file and what to check, rather than trying the masters for its
failover time. Standard library only: every command that calls a master reads this.
"""

from __future__ import annotations

import socket
import ssl
import urllib.parse
from pathlib import Path

from shoal.masters import Unreachable

_SHOW = "`shoal tls show` on a master lists its certificate's names and dates"

# OpenSSL's verify codes (X509_V_ERR_*) of the failures a person can tell apart.
_EXPIRED = 10
_NOT_YET_VALID = 9
_NAME_MISMATCH = {62, 64}  # a host name, an IP address
_UNTRUSTED = {18, 19, 20, 21}  # self-signed leaf or chain, issuer unknown, leaf alone


class UntrustedMaster(Unreachable):
    """A master's certificate did not pass (another authority's, a name it does not
    cover, out of date), or TLS was met where plain HTTP was expected or the reverse."""


def master_context(ca: str | Path) -> ssl.SSLContext:
    """A client context that trusts the cluster CA in the file `ca` and nothing else."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except FileNotFoundError:
        raise UntrustedMaster(
            f"the cluster CA file {ca} does not exist: set `ca` in the client file (or SHOAL_CA) "
            "to a copy of the cluster's ca.pem (`shoal tls init` printed where it is)"
        ) from None
    except ssl.SSLError as e:
        raise UntrustedMaster(
            f"the cluster CA file {ca} holds no PEM certificate ({e.reason or e}): it should be a "
            "copy of the cluster's ca.pem"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def untrusted(error: BaseException, url: str, ca: str | Path | None) -> UntrustedMaster | None:
    """What a failed connection to the master at `url` means, when it is a matter of TLS
    settings rather than a master down; None otherwise."""
    cause = _tls_cause(error)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return UntrustedMaster(_verification(cause, url, ca))
    if isinstance(cause, ssl.SSLError) and cause.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"):
        return UntrustedMaster(
            f"the master at {url} does not speak TLS: if it runs with --insecure, its URL is "
            f"{url.replace('https://', 'http://', 1)}"
        )
    return None


def refused_plain(url: str) -> UntrustedMaster:
    """An http:// call that a master speaking TLS hung up on."""
    return UntrustedMaster(
        f"the master at {url} hung up on plain HTTP: a master serves TLS unless it runs with "
        f"--insecure; use {url.replace('http://', 'https://', 1)}, with `ca` in the client file "
        "(or SHOAL_CA) set to the cluster's ca.pem"
    )


def speaks_tls(url: str, timeout: float = 2.0) -> bool:
    """Whether the server at `url` (host and port; any scheme) completes a TLS handshake,
    its certificate unchecked: asked only to explain a failure."""
    parts = urllib.parse.urlsplit(url)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 80), timeout) as sock:
            probe.wrap_socket(sock, server_hostname=parts.hostname).close()
    except OSError:  # ssl.SSLError included
        return False
    return True


def _verification(error: ssl.SSLCertVerificationError, url: str, ca: str | Path | None) -> str:
    said = error.verify_message or error.reason or str(error)
    if error.verify_code in _NAME_MISMATCH:
        return (
            f"the certificate of the master at {url} does not name the host in the URL ({said}): "
            "use a name or address it has, or reissue it with `shoal tls cert --name/--address`; " + _SHOW
        )
    if error.verify_code in (_EXPIRED, _NOT_YET_VALID):
        return (
            f"the certificate of the master at {url} is out of date ({said}): reissue it with "
            "`shoal tls cert` (the master loads it without a restart), or check this machine's "
            f"clock; {_SHOW}"
        )
    if ca:
        return (
            f"the master at {url} presented a certificate the cluster CA in {ca} did not issue "
            f"({said}): check that {ca} is a copy of this cluster's ca.pem (the master's TLS "
            "directory has it), and that the URL is this cluster's master"
        )
    return (
        f"the master at {url} presented a certificate this machine does not trust ({said}): set "
        "`ca` in the client file (or SHOAL_CA) to a copy of the cluster's ca.pem"
    )


def _tls_cause(error: BaseException) -> BaseException | None:
    """The ssl error behind `error` (httpx wraps httpcore's error, which wraps ssl's)."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None

"""The cluster's certificates: one authority (CA), the masters' server certificates, and a
client certificate per node, bound to the node's name.

`shoal tls init` makes the authority and a master's certificate; a master signs each node's
certificate when the node joins with a bootstrap token (`sign_node`). Keys are ECDSA P-256:
small, and a handshake costs a fraction of an RSA one. The subject of a node's certificate
is `CN=<node>, OU=node`; a master's is `OU=master`, so neither can stand in for the other.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.files import write_secret

CA_DAYS = 3650
MASTER_DAYS = 365
NODE_DAYS = 30
NODE_UNIT = "node"
MASTER_UNIT = "master"
_ORGANIZATION = "shoal"
_BACKDATE = dt.timedelta(minutes=5)  # clocks of a cluster differ a little


class BadRequestForCertificate(ValueError):
    """A certificate signing request that cannot be signed: malformed, its signature wrong,
    its key not P-256, or the name it is to be made out to too long."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where a master keeps the authority and its own certificate (`<state_dir>/tls`)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def cert(self) -> Path:
        return self.root / "master.pem"

    @property
    def key(self) -> Path:
        return self.root / "master.key"

    def complete(self) -> bool:
        return all(p.exists() for p in (self.ca_cert, self.ca_key, self.cert, self.key))


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    """Where an agent keeps its node's key and certificate (`<state_dir>/identity`)."""

    root: Path

    @property
    def cert(self) -> Path:
        return self.root / "node.pem"

    @property
    def key(self) -> Path:
        return self.root / "node.key"

    def exists(self) -> bool:
        return self.cert.exists() and self.key.exists()


@dataclass(frozen=True, slots=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, files: TlsFiles) -> Authority:
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), "the cluster CA's key is not an EC key"
        return cls(x509.load_pem_x509_certificate(files.ca_cert.read_bytes()), key)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_authority(cluster: str = "shoal cluster") -> Authority:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def _leaf(
    authority: Authority,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier,
    days: float,
    names: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(authority.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False
        )
    )
    if names is not None:
        builder = builder.add_extension(names, critical=False)
    return builder.sign(authority.key, hashes.SHA256())


def _alternative_names(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def master_names(extra: list[str]) -> list[str]:
    """What a master's certificate covers: loopback and this host's name, and `extra`."""
    import socket

    return ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra]


def issue_master(authority: Authority, names: list[str], days: float = MASTER_DAYS) -> tuple[bytes, bytes]:
    """A server certificate for a master reached at `names` (host names and addresses): (cert, key) PEM."""
    key = new_key()
    cert = _leaf(
        authority,
        _name(names[0], MASTER_UNIT),
        key.public_key(),
        ExtendedKeyUsageOID.SERVER_AUTH,
        days,
        _alternative_names(names),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def write_master_files(files: TlsFiles, authority: Authority, names: list[str]) -> None:
    """Write the authority (if new) and a fresh master certificate. Each file is replaced
    whole, so a master reloading them never reads half of one."""
    files.root.mkdir(parents=True, exist_ok=True)
    if not files.ca_key.exists():
        write_secret(files.ca_key, key_pem(authority.key).decode())
        write_secret(files.ca_cert, authority.pem().decode())
    cert, key = issue_master(authority, names)
    write_secret(files.key, key.decode())
    write_secret(files.cert, cert.decode())


class Made(NamedTuple):
    authority: bool
    certificate: bool


def init_master_files(files: TlsFiles, names: list[str]) -> Made:
    """What `shoal tls init` does: what `files` lack, made; nothing already there is
    replaced. The authority, then a certificate for the master reached at `names`."""
    made = Made(not files.ca_key.exists(), not (files.cert.exists() and files.key.exists()))
    if made.authority:
        write_master_files(files, create_authority(), names)
    elif made.certificate:
        write_master_files(files, Authority.load(files), names)
    return made


def init_cluster_files(masters: list[TlsFiles], names: list[str]) -> None:
    """Certificates for masters of one cluster on one host (`shoal dev --ha`, tests): the
    first's as `init_master_files` makes them, then one from its authority for each other
    master without one, as `shoal tls cert` would."""
    init_master_files(masters[0], names)
    for files in masters[1:]:
        if not files.complete():
            write_master_files(files, Authority.load(masters[0]), names)


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What `shoal tls show` says of a certificate: never anything of its key."""

    subject: str
    issuer: str
    names: list[str]  # the subject alternative names: DNS names and addresses
    serial: str
    not_before: float  # seconds since the epoch
    not_after: float


def describe(pem: bytes) -> CertificateInfo:
    cert = x509.load_pem_x509_certificate(pem)
    try:
        alternative = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in alternative]
    except x509.ExtensionNotFound:
        names = []
    return CertificateInfo(
        cert.subject.rfc4514_string(),
        cert.issuer.rfc4514_string(),
        names,
        serial_hex(cert.serial_number),
        cert.not_valid_before_utc.timestamp(),
        cert.not_valid_after_utc.timestamp(),
    )


def node_request(name: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate signing request for node `name`, PEM."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(name, NODE_UNIT))
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class NodeCertificate:
    pem: bytes
    serial: str  # hex, as `ssl.getpeercert()` gives it
    not_after: float  # seconds since the epoch
    key: str  # the digest of its public key (`key_digest`)

    @classmethod
    def of(cls, pem: bytes) -> NodeCertificate:
        """A certificate as `sign_node` gave it, read again from its PEM."""
        cert = x509.load_pem_x509_certificate(pem)
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)  # a node's: sign_node made it
        return cls(pem, serial_hex(cert.serial_number), cert.not_valid_after_utc.timestamp(), key_digest(key))


def key_digest(key: ec.EllipticCurvePublicKey) -> str:
    """A public key's SHA-256 (of its SubjectPublicKeyInfo, DER), hex: what names the key a
    request was made with, and the key a certificate certifies."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return digest.finalize().hex()


def request_key(request_pem: bytes) -> str:
    """The `key_digest` of a node's certificate signing request's key, checked as `read_request` does."""
    key = read_request(request_pem).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # read_request saw to it
    return key_digest(key)


def read_request(request_pem: bytes) -> x509.CertificateSigningRequest:
    """A node's certificate signing request, checked: PEM, signed by its key, a P-256 key."""
    try:
        csr = x509.load_pem_x509_csr(request_pem)
    except ValueError as e:
        raise BadRequestForCertificate(f"not a PEM certificate signing request: {e}") from None
    if not csr.is_signature_valid:
        raise BadRequestForCertificate("the request's signature does not match its key")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise BadRequestForCertificate("the request's key must be an EC P-256 (secp256r1) key")
    return csr


def sign_node(
    authority: Authority, request_pem: bytes, name: str, days: float = NODE_DAYS
) -> NodeCertificate:
    """Sign a node's request with the subject set to `name`, whatever the request asked for:
    the identity is the one the master grants, not the one the node claims."""
    public_key = read_request(request_pem).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)  # read_request saw to it
    try:
        subject = _name(name, NODE_UNIT)
    except ValueError as e:  # a common name holds 64 characters at most
        raise BadRequestForCertificate(f"no certificate can be made out to {name!r}: {e}") from None
    cert = _leaf(authority, subject, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, days)
    return NodeCertificate(
        cert.public_bytes(serialization.Encoding.PEM),
        serial_hex(cert.serial_number),
        cert.not_valid_after_utc.timestamp(),
        key_digest(public_key),
    )


def serial_hex(serial: int) -> str:
    return f"{serial:X}" if len(f"{serial:X}") % 2 == 0 else f"0{serial:X}"


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is at the other end of a TLS connection, from its verified certificate."""

    name: str
    unit: str  # NODE_UNIT or MASTER_UNIT
    serial: str


def peer_of(cert: dict | None) -> Peer | None:  # type: ignore[type-arg]
    """The peer a verified certificate (`SSLObject.getpeercert()`) names, if any."""
    if not cert:
        return None
    fields = {key: value for rdn in cert.get("subject", ()) for key, value in rdn}
    if fields.get("organizationName") != _ORGANIZATION or "commonName" not in fields:
        return None
    return Peer(fields["commonName"], fields.get("organizationalUnitName", ""), cert.get("serialNumber", ""))


def certificate_times(pem: bytes) -> tuple[float, float]:
    """(not before, not after) of a PEM certificate, seconds since the epoch."""
    cert = x509.load_pem_x509_certificate(pem)
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The master's context: its certificate, and the cluster CA to verify the client
    certificates nodes present. People and programs present none (they bring tokens), so a
    certificate is optional; one that is presented must be the CA's."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_cert_chain(files.cert, files.key)
    return context


def client_context(ca: Path | str, identity: IdentityFiles | None = None) -> ssl.SSLContext:
    """A context that trusts only the cluster CA (`ca`: a file), presenting `identity` if given."""
    from shoal.trust import master_context

    context = master_context(ca)
    if identity is not None:
        context.load_cert_chain(identity.cert, identity.key)
    return context

"""Webhook serving certificates: a self-signed CA kept in a Secret, or files given from outside.

Why a CA in a Secret: the API server trusts the webhook through the ``caBundle`` of the
MutatingWebhookConfiguration. If the operator minted a fresh CA on every start, each restart
would leave a window where the registered bundle does not match the served certificate, and
(with failurePolicy Ignore) pods would silently go uninjected. Keeping the CA in a Secret makes
the bundle stable across restarts; the serving certificate is re-issued from the same CA when
its names change or it nears expiry. With cert-manager (the chart), files are mounted instead
and this module only reads them.

Generation and validation are pure; :func:`ensure_tls_secret` is the only I/O (read the Secret,
keep it when valid, otherwise create or replace it with optimistic concurrency), through the
operator's one client, :class:`resultstore_operator.kube.Kube`.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .api import LABEL_COMPONENT, LABEL_NAME, TLS_SECRET_TYPE
from .kube import Conflict, Kube, meta

log = logging.getLogger("resultstore.webhook.tls")

CA_VALIDITY = dt.timedelta(days=3650)
SERVING_VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)

SECRET_TYPE = TLS_SECRET_TYPE
KEY_CA_CRT = "ca.crt"
KEY_CA_KEY = "ca.key"
KEY_TLS_CRT = "tls.crt"
KEY_TLS_KEY = "tls.key"


@dataclass(frozen=True)
class TlsBundle:
    """PEM material: the CA (key optional when externally managed) and the serving pair."""

    ca_crt: bytes
    tls_crt: bytes
    tls_key: bytes
    ca_key: bytes | None = None

    def __repr__(self) -> str:  # keys never reach logs
        return "TlsBundle(<pem>)"

    def to_secret_data(self) -> dict[str, str]:
        data = {KEY_CA_CRT: self.ca_crt, KEY_TLS_CRT: self.tls_crt, KEY_TLS_KEY: self.tls_key}
        if self.ca_key is not None:
            data[KEY_CA_KEY] = self.ca_key
        return {k: base64.b64encode(v).decode() for k, v in data.items()}

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str] | None) -> TlsBundle | None:
        data = data or {}
        try:
            raw = {k: base64.b64decode(v) for k, v in data.items()}
            return cls(ca_crt=raw[KEY_CA_CRT], tls_crt=raw[KEY_TLS_CRT],
                       tls_key=raw[KEY_TLS_KEY], ca_key=raw.get(KEY_CA_KEY))
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class ServingNames:
    """The names the API server uses to reach the webhook (Service DNS names and/or an IP)."""

    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()

    def sans(self) -> list[x509.GeneralName]:
        out: list[x509.GeneralName] = [x509.DNSName(n) for n in self.dns]
        out += [x509.IPAddress(ipaddress.ip_address(i)) for i in self.ips]
        return out


def service_names(service: str, namespace: str) -> tuple[str, ...]:
    """The DNS names a Service is reached by (the API server uses ``<svc>.<ns>.svc``)."""
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate_ca(common_name: str = "resultstore-webhook-ca",
                now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """A new self-signed CA: (certificate PEM, private key PEM)."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue_serving_cert(ca_crt: bytes, ca_key: bytes, names: ServingNames,
                       now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """A serving certificate for ``names`` signed by the CA: (certificate PEM, key PEM)."""
    now = now or _now()
    ca_cert = x509.load_pem_x509_certificate(ca_crt)
    ca_private = serialization.load_pem_private_key(ca_key, password=None)
    if not isinstance(ca_private, ec.EllipticCurvePrivateKey):
        raise ValueError("unsupported CA key type")
    key = ec.generate_private_key(ec.SECP256R1())
    cn = names.dns[0] if names.dns else (names.ips[0] if names.ips else "resultstore-webhook")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + SERVING_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names.sans()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_private.public_key()),
                       critical=False)
        .sign(ca_private, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def new_bundle(names: ServingNames, now: dt.datetime | None = None) -> TlsBundle:
    ca_crt, ca_key = generate_ca(now=now)
    tls_crt, tls_key = issue_serving_cert(ca_crt, ca_key, names, now=now)
    return TlsBundle(ca_crt=ca_crt, tls_crt=tls_crt, tls_key=tls_key, ca_key=ca_key)


def ca_problem(bundle: TlsBundle, now: dt.datetime | None = None) -> str | None:
    """Why the CA cannot keep being used (None when it can): unparsable, expiring, no key."""
    now = now or _now()
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_crt)
        if bundle.ca_key is None:
            return "CA key missing"
        key = serialization.load_pem_private_key(bundle.ca_key, password=None)
    except ValueError:
        return "CA unparsable"
    if ca.public_key() != key.public_key():
        return "CA key does not match the CA certificate"
    if ca.not_valid_after_utc - now < RENEW_BEFORE:
        return "CA expires soon"
    return None


def serving_problem(bundle: TlsBundle, names: ServingNames,
                    now: dt.datetime | None = None) -> str | None:
    """Why the serving pair cannot be served (None when it can): signature, names, expiry, key."""
    now = now or _now()
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_crt)
        cert = x509.load_pem_x509_certificate(bundle.tls_crt)
        key = serialization.load_pem_private_key(bundle.tls_key, password=None)
    except ValueError:
        return "serving certificate unparsable"
    if cert.public_key() != key.public_key():
        return "serving key does not match the certificate"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "serving certificate not issued by the CA"
    if cert.not_valid_after_utc - now < RENEW_BEFORE or cert.not_valid_before_utc > now:
        return "serving certificate outside its validity window"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "serving certificate has no subjectAltName"
    have = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    want_ips = {str(ipaddress.ip_address(i)) for i in names.ips}
    if not set(names.dns) <= have or not want_ips <= have_ips:
        return "serving certificate does not cover the webhook's names"
    return None


def reconcile_bundle(current: TlsBundle | None, names: ServingNames,
                     now: dt.datetime | None = None) -> tuple[TlsBundle, str | None]:
    """The bundle to serve, and why it changed (None: ``current`` is kept as is).

    The CA is kept whenever it is still usable so the registered caBundle stays valid; only
    the serving pair is re-issued when it no longer fits.
    """
    if current is None:
        return new_bundle(names, now), "created"
    why_ca = ca_problem(current, now)
    if why_ca is not None:
        return new_bundle(names, now), f"new CA: {why_ca}"
    why = serving_problem(current, names, now)
    if why is None:
        return current, None
    assert current.ca_key is not None
    tls_crt, tls_key = issue_serving_cert(current.ca_crt, current.ca_key, names, now)
    return TlsBundle(current.ca_crt, tls_crt, tls_key, current.ca_key), f"re-issued: {why}"


def build_tls_secret(name: str, namespace: str, bundle: TlsBundle,
                     labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Secret body holding the bundle (type kubernetes.io/tls, plus ca.crt and ca.key)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {LABEL_NAME: "resultstore-operator",
                                LABEL_COMPONENT: "webhook", **(labels or {})}},
        "type": SECRET_TYPE,
        "data": bundle.to_secret_data(),
    }


def ensure_tls_secret(kube: Kube, namespace: str, name: str, names: ServingNames,
                      attempts: int = 5) -> TlsBundle:
    """Read the TLS Secret, keep it if valid, otherwise create/replace it; return the bundle.

    Several operator replicas (or a restart racing the old pod) may do this at once:
    creation answers Conflict (AlreadyExists) and replacement carries the resourceVersion
    (Conflict when someone wrote in between), and a loser re-reads and adopts the winner's
    bundle.
    """
    for _ in range(attempts):
        secret = kube.read_secret(namespace, name)
        current = TlsBundle.from_secret_data(secret.get("data") if secret is not None else None)
        bundle, why = reconcile_bundle(current, names)
        if why is None:
            return bundle
        body = build_tls_secret(name, namespace, bundle)
        try:
            if secret is None:
                kube.create_secret(namespace, body)
            else:
                body["metadata"]["resourceVersion"] = meta(secret).resource_version
                kube.replace_secret(namespace, name, body)
        except Conflict:
            continue  # somebody else wrote it first: adopt theirs on the next pass
        log.info("webhook TLS Secret %s/%s %s", namespace, name, why)
        return bundle
    raise RuntimeError(f"could not settle the webhook TLS Secret {namespace}/{name}")


def read_bundle_files(cert_file: str, key_file: str, ca_file: str | None) -> TlsBundle:
    """An externally managed bundle (cert-manager): the CA is the given file or the chain's last."""
    with open(cert_file, "rb") as f:
        tls_crt = f.read()
    with open(key_file, "rb") as f:
        tls_key = f.read()
    if ca_file:
        with open(ca_file, "rb") as f:
            ca_crt = f.read()
    else:
        certs = x509.load_pem_x509_certificates(tls_crt)
        ca_crt = certs[-1].public_bytes(serialization.Encoding.PEM)
    return TlsBundle(ca_crt=ca_crt, tls_crt=tls_crt, tls_key=tls_key)


def write_bundle_files(bundle: TlsBundle, directory: str) -> tuple[str, str]:
    """Write the serving pair for ``ssl.load_cert_chain`` (key file mode 0600)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_path = os.path.join(directory, KEY_TLS_CRT)
    key_path = os.path.join(directory, KEY_TLS_KEY)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(bundle.tls_key)
    with open(cert_path, "wb") as f:
        f.write(bundle.tls_crt)
    return cert_path, key_path


def ca_bundle_b64(bundle: TlsBundle) -> str:
    """The caBundle field value (base64 of the CA PEM)."""
    return base64.b64encode(bundle.ca_crt).decode()

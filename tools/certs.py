"""A private CA and one certificate per node, for TLS on every link (`make certs`).

    python tools/certs.py                          # into certs/: the CA, leader, follower1-9,
                                                   # node1-9 (HA), etcd and a client
    python tools/certs.py --out /tmp/c leader follower1 follower2
    python tools/certs.py --host kv.example.org    # one more name in every certificate

Each node's certificate names the node, `localhost`, 127.0.0.1 and ::1 in its
subjectAltName, and may serve (serverAuth) and call other nodes (clientAuth: replication's
mutual TLS). Files: `ca.pem` (give it to clients: `curl --cacert certs/ca.pem`), and per
name `<name>.pem` and `<name>-key.pem` (private, mode 0600). The CA's own key, `ca-key.pem`,
is only needed to issue more certificates: keep it elsewhere on a real network. An existing
CA in `--out` is reused, so adding a node keeps the others' certificates valid.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NAMES = (
    ["leader"]
    + [f"follower{i}" for i in range(1, 10)]
    + [f"node{i}" for i in range(1, 10)]
    + [f"ha{i}" for i in range(1, 7)]
    + ["etcd", "haproxy", "client"]
)
LOOPBACK = ["localhost", "127.0.0.1", "::1"]
VALID_DAYS = 825  # the longest a browser accepts for a server certificate


def new_key() -> ec.EllipticCurvePrivateKey:
    """P-256: as strong as RSA-3072 for this purpose, and a thousand times faster to make."""
    return ec.generate_private_key(ec.SECP256R1())


def write_private(path: Path, key: ec.EllipticCurvePrivateKey, mode: int = 0o600) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)  # after the write: never readable by others while it is written


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def subject_alt_names(names: Sequence[str]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # in order, once each
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
NODE_USAGE = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
KeyPair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def make_ca(out: Path, now: datetime.datetime) -> KeyPair:
    """The CA in `out`, made now unless it is already there."""
    cert_path, key_path = out / "ca.pem", out / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SystemExit(f"{key_path} is not an EC key made by this tool")
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "replicated-kv private CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, key)
    write_cert(cert_path, cert)
    return cert, key


def issue(
    name: str,
    hosts: Sequence[str],
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
) -> KeyPair:
    key = new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(subject_alt_names([name, *hosts, *LOOPBACK]), critical=False)
        .add_extension(NODE_USAGE, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_certs(
    out: Path, names: Sequence[str], hosts: Sequence[str] = (), readable_keys: bool = False
) -> list[Path]:
    """The CA (made once) and a fresh certificate for each of `names`; the files written.
    `readable_keys`: the nodes' keys 0644 instead of 0600 (for containers; see --help)."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca, ca_key = make_ca(out, now)
    written = [out / "ca.pem"]
    for name in names:
        cert, key = issue(name, hosts, ca, ca_key, now)
        write_private(out / f"{name}-key.pem", key, 0o644 if readable_keys else 0o600)
        write_cert(out / f"{name}.pem", cert)
        written.append(out / f"{name}.pem")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names",
        nargs="*",
        default=DEFAULT_NAMES,
        help="one certificate each (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "certs", help="default: certs/")
    parser.add_argument(
        "--host", action="append", default=[], help="one more DNS name or IP in every certificate"
    )
    parser.add_argument(
        "--readable-keys",
        action="store_true",
        help="write the nodes' keys readable by every user (0644), for containers that run as "
        "another uid (docker-compose.tls.yml); the CA's key stays 0600",
    )
    args = parser.parse_args(argv)
    for name in args.names:
        if not name or "/" in name or name.startswith("."):
            parser.error(f"{name!r} cannot name a certificate file")
    written = make_certs(args.out, args.names, args.host, args.readable_keys)
    print(f"{len(written) - 1} certificates signed by {args.out / 'ca.pem'}, in {args.out}/")
    print(f"  try: curl --cacert {args.out / 'ca.pem'} https://127.0.0.1:8000/health")


if __name__ == "__main__":
    main()

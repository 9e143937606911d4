"""The cluster's certificate authority and node certificates (mutual TLS).

`make_ca` once per cluster (at init, or by the dev harness); `issue` a key
and certificate per node, naming the node (DNS) and its address (IP), valid
for both ends of a connection.  Keys are written 0600.  `write_crl` lists
the certificates of removed nodes for etcd (drvs/cluster/revocation.py)."""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=3650)


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    os.fchmod(fd, mode)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: str, cluster: str) -> tuple[str, str]:
    """ca.pem and ca.key in directory; returns their paths."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"drvs cluster {cluster} CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    ca, ca_key = f"{directory}/ca.pem", f"{directory}/ca.key"
    _write(ca, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(ca_key, _key_pem(key), 0o600)
    return ca, ca_key


def fingerprint(ca_pem: bytes) -> str:
    """sha256 of the CA certificate (DER), hex: what a join token pins."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    return cert.fingerprint(hashes.SHA256()).hex()


def new_key_and_csr(node: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)])).sign(key, hashes.SHA256()))
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def sign_csr(ca: str, ca_key: str, csr_pem: bytes, node: str, address: str) -> bytes:
    """A node certificate for the CSR's key; names and uses are ours to set,
    not the requester's."""
    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise ValueError("the certificate request's signature is invalid")
    return _node_cert(ca, ca_key, csr.public_key(), node, address).public_bytes(serialization.Encoding.PEM)


def _node_cert(ca: str, ca_key: str, public_key, node: str, address: str):
    with open(ca, "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(ca_key, "rb") as f:
        signer = serialization.load_pem_private_key(f.read(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca_cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node),
                                                        x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(signer, hashes.SHA256()))


def write_node_files(directory: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> dict:
    """The `tls` entry of cluster.json, written out."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    paths = {"ca": f"{directory}/ca.pem", "cert": f"{directory}/node.pem", "key": f"{directory}/node.key"}
    _write(paths["ca"], ca_pem, 0o644)
    _write(paths["cert"], cert_pem, 0o644)
    _write(paths["key"], key_pem, 0o600)
    return paths


def issue(ca: str, ca_key: str, node: str, address: str, directory: str) -> dict:
    """A key and certificate for node, signed by the CA; returns the paths as
    the `tls` entry of cluster.json ({ca, cert, key})."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _node_cert(ca, ca_key, key.public_key(), node, address)
    with open(ca, "rb") as f:
        ca_pem = f.read()
    return write_node_files(directory, ca_pem, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def serial_of(cert_pem: bytes) -> str:
    """A certificate's serial number, hex: how revocation names it."""
    return format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")


def write_crl(path: str, ca: str, ca_key: str, serials) -> None:
    """A certificate revocation list of the CA naming serials (hex), put in
    place at once: etcd reads it at every connection it accepts."""
    with open(ca, "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(ca_key, "rb") as f:
        signer = serialization.load_pem_private_key(f.read(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
           .last_update(now - datetime.timedelta(minutes=5)).next_update(now + VALIDITY))
    for serial in sorted(serials):
        crl = crl.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                                          .revocation_date(now).build())
    tmp = f"{path}.tmp"
    _write(tmp, crl.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), 0o644)
    os.rename(tmp, path)

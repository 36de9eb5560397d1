"""A certificate authority of the test's own, for servers that speak TLS (``openssl``).

Every certificate lives one day in the test's directory; a client trusts the servers it
signs by naming :attr:`Certificates.ca`, never the system's store.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import TIMEOUT


class Certificates:
    """A certificate authority of the test's own, and certificates it signs (``openssl``)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca, ca_key = self.directory / "ca.pem", self.directory / "ca-key.pem"
        self._ca_key = ca_key
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
                 "-out", str(self.ca), "-days", "1", "-subj", "/CN=digitstream test CA")

    def issue(self, name: str, san: str | None = None) -> tuple[Path, Path]:
        """A certificate and key for ``name`` signed by the CA; ``san``: its subjectAltName."""
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"
        csr, ext = self.directory / f"{name}.csr", self.directory / f"{name}.ext"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={name}")
        ext.write_text(f"subjectAltName={san}\n" if san else "")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey",
                 str(self._ca_key), "-CAcreateserial", "-out", str(cert), "-days", "1",
                 "-extfile", str(ext))
        return cert, key

    def keystore(self, name: str, password: str, san: str | None = None) -> Path:
        """A PKCS#12 keystore holding a certificate for ``name`` and its key, for a Java
        server (``ssl.keystore.type=PKCS12``)."""
        cert, key = self.issue(name, san)
        store = self.directory / f"{name}.p12"
        _openssl("pkcs12", "-export", "-in", str(cert), "-inkey", str(key), "-certfile",
                 str(self.ca), "-name", name, "-out", str(store), "-passout", f"pass:{password}")
        return store


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=TIMEOUT)

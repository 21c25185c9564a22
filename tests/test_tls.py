"""Verified TLS to MySQL, for real: a private MariaDB that requires TLS, with CAs made here.

The server's certificate names `localhost` only and is signed by a CA made for the test; another
CA stands for a wrong bundle, and 127.0.0.1 for a wrong host name.
"""

import datetime
import http.client
import json
import os
import subprocess
import sys
import uuid

import pymysql
import pytest
from conftest import ROOT, free_port, mysql_env
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_drills import throwaway_mariadb

import cars


def certificate(subject, issuer_name, issuer_key, public_key, ca, names=()):
    """Sign one certificate valid for a day."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_ca(name):
    """Return (key, certificate) of a self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return key, certificate(name, subject, key, key.public_key(), ca=True)


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def tls_mariadb(tmp_path_factory):
    """A private MariaDB with require_secure_transport and a certificate for `localhost`."""
    certs = tmp_path_factory.mktemp("tls")
    ca_key, ca = make_ca("cars-api test CA")
    _, rogue = make_ca("cars-api rogue CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = certificate(
        "localhost", ca.subject, ca_key, server_key.public_key(), ca=False, names=["localhost"]
    )
    (certs / "ca.pem").write_bytes(pem(ca))
    (certs / "rogue.pem").write_bytes(pem(rogue))
    (certs / "server.pem").write_bytes(pem(server))
    (certs / "server.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    options = [
        f"--ssl-ca={certs / 'ca.pem'}",
        f"--ssl-cert={certs / 'server.pem'}",
        f"--ssl-key={certs / 'server.key'}",
        "--require-secure-transport=ON",
        "--tls-version=TLSv1.2,TLSv1.3",
    ]
    with throwaway_mariadb(options) as mariadb:
        mariadb.certs = certs
        yield mariadb


def tls_env(mariadb, host, ca):
    return {
        **mariadb.env(f"tls_{uuid.uuid4().hex[:8]}"),
        "MYSQL_HOST": host,
        "MYSQL_SSL_CA": str(ca),
    }


def get(server, path):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path)
        res = conn.getresponse()
        return res.status, json.loads(res.read())
    finally:
        conn.close()


def test_the_server_refuses_a_connection_without_tls(tls_mariadb):
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(
            host="127.0.0.1", port=tls_mariadb.port, user="root", password="", ssl_disabled=True
        )


def test_the_right_ca_and_host_name_connect(run_server, tls_mariadb):
    server = run_server(tls_env(tls_mariadb, "localhost", tls_mariadb.certs / "ca.pem"))
    assert get(server, "/ready")[0] == 200
    assert get(server, "/cars") == (200, [])


def test_the_ca_can_be_given_as_pem_text(run_server, tls_mariadb):
    ca_text = (tls_mariadb.certs / "ca.pem").read_text()
    server = run_server(tls_env(tls_mariadb, "localhost", ca_text))
    assert get(server, "/ready")[0] == 200


@pytest.mark.parametrize(
    ("host", "ca", "reason"),
    [
        ("localhost", "rogue.pem", "certificate verify failed"),
        ("127.0.0.1", "ca.pem", "IP address mismatch"),
    ],
    ids=["wrong_ca", "wrong_host_name"],
)
def test_a_wrong_ca_or_host_name_is_a_503_and_a_clear_log_line(
    run_server, tls_mariadb, host, ca, reason
):
    server = run_server(tls_env(tls_mariadb, host, tls_mariadb.certs / ca))
    status, body = get(server, "/ready")
    assert status == 503
    assert body["status"] == 503
    logged = [json.loads(line) for line in server.log().splitlines()]
    assert any(reason in entry.get("error", "") for entry in logged), logged[-3:]


def test_an_unreadable_ca_stops_start_up():
    settings = cars.load_settings({"MYSQL_HOST": "localhost", "MYSQL_SSL_CA": "/nonexistent.pem"})
    with pytest.raises(SystemExit) as stopped:
        cars.Database(settings)
    assert "MYSQL_SSL_CA" in str(stopped.value)


def start_up(env):
    """Run the server with env until it stops or listens; return (exit code or None, output)."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MYSQL_", "API_TOKEN"))}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cars.py")],
        env={**keep, "HOST": "127.0.0.1", "PORT": str(free_port()), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        return None, out
    return proc.returncode, out


def test_a_remote_mysql_without_a_ca_stops_start_up_with_one_line():
    code, out = start_up({"MYSQL_HOST": "db.internal.example", "MYSQL_PASSWORD": "x"})
    assert code == 1
    (line,) = [json.loads(text) for text in out.splitlines()]
    assert "MYSQL_SSL_CA" in line["message"]
    assert "ALLOW_UNVERIFIED_MYSQL=true" in line["message"]
    assert "db.internal.example" in line["message"]


@pytest.mark.parametrize("way", ["allowed_unverified", "with_a_ca"])
def test_a_remote_mysql_is_allowed_unverified_on_request_or_with_a_ca(run_server, way):
    ca_text = pem(make_ca("cars-api start-up CA")[1]).decode()
    extra = {"ALLOW_UNVERIFIED_MYSQL": "true"} if way == "allowed_unverified" else {}
    extra = extra or {"MYSQL_SSL_CA": ca_text}
    # TEST-NET-3 (RFC 5737): nothing answers there; the server starts without the database.
    server = run_server({"MYSQL_HOST": "203.0.113.7", **extra})
    assert server.proc.poll() is None
    assert ("not verified" in server.log()) == (way == "allowed_unverified")


def test_a_ca_set_for_a_server_without_tls_is_a_503_not_a_500(run_server, mysql_database, tmp_path):
    # The shared test MariaDB offers no TLS: PyMySQL fails the connection with error 2026.
    _, ca = make_ca("cars-api unused CA")
    (tmp_path / "ca.pem").write_bytes(pem(ca))
    server = run_server({**mysql_env(mysql_database), "MYSQL_SSL_CA": str(tmp_path / "ca.pem")})
    for path in ("/ready", "/cars"):
        status, body = get(server, path)
        assert (status, body["status"]) == (503, 503), body
    logged = [json.loads(line) for line in server.log().splitlines()]
    assert any("SSL" in entry.get("error", "") for entry in logged), logged[-3:]
    assert not [entry for entry in logged if entry.get("status") == 500]

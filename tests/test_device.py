"""Device credentials and the device command (fedsqueeze/device.py), without Flower daemons.

Adversaries: an impostor SuperLink on the network (a certificate from another CA, or the
right CA's certificate for another host) — the device's TLS check must refuse it; someone
reading the key files on disk — private keys are 0600 from creation. The end-to-end TLS +
SuperNode-authentication run (a stranger's SuperNode refused) is in test_deployment.py.
"""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from fedsqueeze.cli import main
from fedsqueeze.device import (
    DeviceError,
    make_certificates,
    make_node_key,
    node_config_arg,
    parser,
    supernode_argv,
)


def _handshake(creds_dir: Path, ca_file: Path, server_name: str) -> None:
    """A real TLS handshake: a server with ``creds_dir``'s certificate, a client that trusts
    ``ca_file`` and expects ``server_name`` (as grpc does for a SuperNode)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds_dir / "server.pem", creds_dir / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            tls.sendall(b"x")
    finally:
        listener.close()
        thread.join(timeout=10)


def test_certificates_verify_for_their_hosts_and_keys_are_private(tmp_path: Path) -> None:
    creds = make_certificates(tmp_path / "c", hosts=("localhost", "127.0.0.1"), days=30)
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for key in (creds.ca_key, creds.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    _handshake(creds.ca_cert.parent, creds.ca_cert, "127.0.0.1")
    _handshake(creds.ca_cert.parent, creds.ca_cert, "localhost")


def test_an_impostor_superlink_is_refused_by_the_device(tmp_path: Path) -> None:
    ours = make_certificates(tmp_path / "ours", hosts=("127.0.0.1",))
    theirs = make_certificates(tmp_path / "theirs", hosts=("127.0.0.1",))
    # The impostor's own CA signed its certificate: the device trusts only ours.
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(theirs.ca_cert.parent, ours.ca_cert, "127.0.0.1")
    # Our CA's certificate, presented for a host it was not issued for.
    with pytest.raises(ssl.SSLCertVerificationError, match=r"match|mismatch"):
        _handshake(ours.ca_cert.parent, ours.ca_cert, "10.0.0.7")


def test_node_key_is_what_flower_reads_and_is_never_overwritten(tmp_path: Path) -> None:
    private, public = make_node_key(tmp_path / "device")
    assert public == tmp_path / "device.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode does
    pub = load_ssh_public_key(public.read_bytes())  # what `flwr supernode register` does
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP384R1)
    assert pub.public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    before = private.read_bytes()
    with pytest.raises(DeviceError, match="already exists"):
        make_node_key(private)
    assert private.read_bytes() == before
    (tmp_path / "ca.crt").write_text("an existing CA")
    with pytest.raises(DeviceError, match="already exists"):
        make_certificates(tmp_path)
    assert (tmp_path / "ca.crt").read_text() == "an existing CA"


@pytest.mark.parametrize("path", ["/data/dev ice/x.npz", "/d/x.npz", "/d/ünï.npz"])
def test_node_config_reaches_flower_unchanged(path: str) -> None:
    arg = node_config_arg(Path(path), ["dp-max-epsilon=8", "secagg-identity-key=/k/id", "x=true"])
    parsed = parse_config_args([arg])  # flower-supernode's own parser
    assert parsed == {
        "data-path": path,
        "dp-max-epsilon": 8,
        "secagg-identity-key": "/k/id",
        "x": True,
    }


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (["data-path=/other"], "given twice"),
        (["novalue"], "expected KEY=VALUE"),
        (["k=a'b"], "quotes"),
    ],
)
def test_node_config_rejects_what_flower_would_misparse(extra: list[str], error: str) -> None:
    with pytest.raises(DeviceError, match=error):
        node_config_arg(Path("/d/x.npz"), extra)
    with pytest.raises(DeviceError, match="quotes"):
        node_config_arg(Path('/d/x".npz'))


def _args(tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "data.npz"
    data.write_bytes(b"")
    return ["--superlink", "10.0.0.1:9092", "--data-path", str(data), *extra]


def test_device_command_line(tmp_path: Path) -> None:
    creds = make_certificates(tmp_path / "c", hosts=("127.0.0.1",))
    key, _ = make_node_key(tmp_path / "k")
    args = parser("device").parse_args(
        _args(
            tmp_path,
            *("--root-certificates", str(creds.ca_cert), "--auth-key", str(key)),
            *("--max-retries", "5", "--port", "9111"),
            *("--partition-id", "1", "--num-partitions", "3"),
        )
    )
    argv = supernode_argv(args)
    assert Path(argv[0]).name == "flower-supernode"
    joined = " ".join(argv)
    assert "--insecure" not in argv
    assert f"--root-certificates {creds.ca_cert}" in joined
    assert f"--auth-supernode-private-key {key}" in joined
    assert "--max-retries 5" in joined and "--port 9111" in joined
    node_config = argv[argv.index("--node-config") + 1]
    assert parse_config_args([node_config]) == {
        "data-path": str(tmp_path / "data.npz"),
        "partition-id": 1,
        "num-partitions": 3,
    }


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ([], "--root-certificates CA.crt (TLS) or --insecure"),
        (["--insecure", "--root-certificates", "CA"], "or --insecure"),
        (["--insecure", "--auth-key", "k"], "--auth-key needs TLS"),
        (["--root-certificates", "/no/ca.crt"], "no such file"),
        (["--insecure", "--partition-id", "0"], "together"),
        (["--insecure", "--partition-id", "3", "--num-partitions", "3"], "not in 0..2"),
    ],
)
def test_device_usage_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], error: str
) -> None:
    assert main(["device", *_args(tmp_path, *extra), "--print"]) == 2
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1 and err.startswith("fedsqueeze: error:")
    assert main(["device", "--superlink", "nohost", "--data-path", "/x", "--insecure"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_certs_and_node_key_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", str(tmp_path / "c"), "--host", "fl.example.org", "--host", "::1"]) == 0
    assert (tmp_path / "c" / "server.pem").is_file()
    assert main(["node-key", str(tmp_path / "n")]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    assert main(["node-key", str(tmp_path / "n")]) == 2
    assert main(["certs", str(tmp_path / "d"), "--host", "bad host"]) == 2
    assert "neither an IP address nor a host name" in capsys.readouterr().err
    assert not (tmp_path / "d" / "ca.key").exists()

"""Devices in a real federation: credentials, and one command that starts a SuperNode.

Three subcommands of ``fedsqueeze`` (dispatched before anything imports torch or Flower):

``fedsqueeze certs DIR [--host NAME ...] [--days N]``
    On the server: a certificate authority (``ca.crt``, ``ca.key``) and the SuperLink's TLS
    certificate (``server.pem``, ``server.key``) signed by it, valid for the given host
    names / IP addresses (default ``localhost 127.0.0.1 ::1``). ``ca.crt`` goes to every
    device; the two ``.key`` files never leave the server.
``fedsqueeze node-key PATH``
    On a device: its SuperNode authentication key pair, ``PATH`` (private, mode 0600) and
    ``PATH.pub`` (OpenSSH, EC P-384: what ``flower-supernode --auth-supernode-private-key``
    and ``flwr supernode register`` read). Only ``PATH.pub`` goes to the server.
``fedsqueeze device --superlink HOST:PORT --data-path FILE --root-certificates CA [--auth-key K]``
    Replaces itself (``exec``, same PID: fit for systemd) with ``flower-supernode`` started
    with fedsqueeze's node config (``data-path`` and any ``--node-config KEY=VALUE``), TLS,
    the authentication key and reconnection settings. ``--print`` shows the command instead.

Adversary the credentials address: someone on the network between device and server
(TLS: they can neither read nor alter the messages, nor pose as the SuperLink without the
CA's key) and a stranger who runs a SuperNode (authentication: the SuperLink refuses a node
whose public key was not registered). Nothing here defends against a registered device
that lies: that is the server's reply validation and the aggregation's job.

Everything is generated with ``cryptography`` (OS entropy), modelled on Flower's
``examples/supernode-authentication``; private keys are created with mode 0600 and never
overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2
SERVER_HOSTS = ("localhost", "127.0.0.1", "::1")
NODE_CONFIG_KEYS_RESERVED = ("data-path",)
"""Set by its own flag; ``--node-config`` may not repeat it."""


class DeviceError(Exception):
    """A usage problem with the device/credential commands (one line, exit status 2)."""


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class ServerCredentials:
    """Paths written by :func:`make_certificates`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write_new(path: Path, data: bytes, private: bool) -> None:
    """Create ``path`` (never overwrite); private files get mode 0600 from the start."""
    mode = 0o600 if private else 0o644
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise DeviceError(f"{path} already exists (not overwritten)") from None
    except OSError as err:
        raise DeviceError(f"cannot create {path}: {err.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certificates(
    out_dir: str | Path, hosts: Sequence[str] = SERVER_HOSTS, days: int = 365
) -> ServerCredentials:
    """A CA and a SuperLink certificate for ``hosts`` (DNS names or IP addresses).

    Keys are EC P-384. The server certificate carries every host as a subjectAltName
    (what TLS clients check), is not a CA, and is valid for ``days`` days.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise DeviceError("give at least one --host for the server certificate")
    if days < 1:
        raise DeviceError(f"--days must be >= 1, not {days}")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:" for c in host):
                raise DeviceError(f"{host!r} is neither an IP address nor a host name") from None
            sans.append(x509.DNSName(host))
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DeviceError(f"cannot create {out}: {err.strerror}") from None
    paths = ServerCredentials(
        out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key"
    )
    for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key):
        if p.exists():
            raise DeviceError(f"{p} already exists (not overwritten)")

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsqueeze federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    _write_new(paths.ca_key, pem_key(ca_key), private=True)
    _write_new(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write_new(paths.server_key, pem_key(server_key), private=True)
    _write_new(
        paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False
    )
    return paths


def make_node_key(path: str | Path) -> tuple[Path, Path]:
    """A SuperNode authentication key pair: ``path`` (OpenSSH private key, mode 0600) and
    ``path.pub`` (OpenSSH public key to register with ``flwr supernode register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = Path(path)
    public = private.with_name(private.name + ".pub")
    for p in (private, public):
        if p.exists():
            raise DeviceError(f"{p} already exists (not overwritten)")
    if not private.parent.is_dir():
        raise DeviceError(f"{private.parent}: no such directory")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_new(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    _write_new(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n",
        private=False,
    )
    return private, public


# --------------------------------------------------------------------------- the SuperNode


def _toml_string(key: str, value: str) -> str:
    """``key="value"`` as ``flower-supernode --node-config`` parses it (a TOML string;
    Flower's parser allows no quote inside, and a backslash would be an escape)."""
    if any(c in value for c in "'\"\\\n\r"):
        raise DeviceError(
            f"node config {key}: quotes, backslashes and newlines are not allowed in {value!r}"
        )
    return f'{key}="{value}"'


def node_config_arg(data_path: Path, extra: Sequence[str] = ()) -> str:
    """The ``--node-config`` string: ``data-path`` (absolute) plus ``KEY=VALUE`` pairs;
    numbers and booleans in ``extra`` stay typed, anything else becomes a string."""
    parts = [_toml_string("data-path", str(data_path))]
    seen = set(NODE_CONFIG_KEYS_RESERVED)
    for item in extra:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(c.isspace() for c in key):
            raise DeviceError(f"--node-config {item!r}: expected KEY=VALUE")
        if key in seen:
            raise DeviceError(f"--node-config {key} given twice (or also by its own flag)")
        seen.add(key)
        value = value.strip()
        try:
            float(value)
            typed = True
        except ValueError:
            typed = value in ("true", "false")
        parts.append(f"{key}={value}" if typed else _toml_string(key, value))
    return " ".join(parts)


def _existing_file(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser().absolute()
    if not p.is_file():
        raise DeviceError(f"{what} {path}: no such file")
    return p


def supernode_argv(args: argparse.Namespace) -> list[str]:
    """The ``flower-supernode`` command line for ``fedsqueeze device``'s arguments.

    Raises
    ------
    DeviceError
        A missing file, TLS and ``--insecure`` both or neither, authentication without TLS,
        a malformed ``--superlink`` or node-config pair.
    """
    host, sep, port = args.superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeviceError(f"--superlink {args.superlink!r}: expected HOST:PORT")
    if args.insecure == bool(args.root_certificates):
        raise DeviceError(
            "give --root-certificates CA.crt (TLS) or --insecure (no TLS, testing only)"
        )
    if args.insecure and args.auth_key:
        raise DeviceError("--auth-key needs TLS: give --root-certificates instead of --insecure")
    data_path = _existing_file(args.data_path, "--data-path")
    root = _existing_file(args.root_certificates, "--root-certificates")
    auth = _existing_file(args.auth_key, "--auth-key")
    assert data_path is not None
    exe = Path(sys.executable).parent / "flower-supernode"
    found = str(exe) if exe.is_file() else shutil.which("flower-supernode")
    if found is None:
        raise DeviceError("flower-supernode not found: is flwr installed (pip install fedsqueeze)?")
    argv = [found, "--superlink", args.superlink]
    argv += ["--insecure"] if args.insecure else ["--root-certificates", str(root)]
    if auth is not None:
        argv += ["--auth-supernode-private-key", str(auth)]
    extra = list(args.node_config)
    if (args.partition_id is None) != (args.num_partitions is None):
        raise DeviceError("give --partition-id and --num-partitions together")
    if args.partition_id is not None:
        if not 0 <= args.partition_id < args.num_partitions:
            raise DeviceError(
                f"--partition-id {args.partition_id} is not in 0..{args.num_partitions - 1}"
            )
        extra += [f"partition-id={args.partition_id}", f"num-partitions={args.num_partitions}"]
    argv += ["--node-config", node_config_arg(data_path, extra)]
    if args.max_retries is not None:
        argv += ["--max-retries", str(args.max_retries)]
    if args.max_wait_time is not None:
        argv += ["--max-wait-time", str(args.max_wait_time)]
    argv += ["--isolation", args.isolation, "--host", "127.0.0.1", "--port", str(args.port)]
    return argv


# --------------------------------------------------------------------------- commands


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise DeviceError(message)


def parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of ``fedsqueeze <command>`` (certs, node-key or device)."""
    p = _Parser(prog=f"fedsqueeze {command}")
    if command == "certs":
        p.description = "CA + SuperLink TLS certificate (server side)"
        p.add_argument("out_dir", metavar="DIR")
        p.add_argument(
            "--host",
            action="append",
            dest="hosts",
            metavar="NAME",
            help=f"DNS name or IP address of the SuperLink (repeatable; default {SERVER_HOSTS})",
        )
        p.add_argument("--days", type=int, default=365, help="validity (default 365)")
    elif command == "node-key":
        p.description = "a SuperNode authentication key pair PATH, PATH.pub (device side)"
        p.add_argument("path", metavar="PATH")
    else:
        p.description = "start this device's SuperNode for fedsqueeze (execs flower-supernode)"
        p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="Fleet API")
        p.add_argument("--data-path", required=True, metavar="FILE.npz", help="this device's data")
        p.add_argument("--root-certificates", metavar="CA.crt", help="CA that signed the server")
        p.add_argument("--insecure", action="store_true", help="no TLS (testing only)")
        p.add_argument(
            "--partition-id",
            type=int,
            metavar="I",
            help="this device's index 0..N-1 in the federation (node config partition-id)",
        )
        p.add_argument(
            "--num-partitions",
            type=int,
            metavar="N",
            help="the federation's size, the run's num-clients (node config num-partitions)",
        )
        p.add_argument("--auth-key", metavar="PATH", help="private key from `fedsqueeze node-key`")
        p.add_argument(
            "--node-config",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="more node config, e.g. secagg-identity-key=PATH or dp-max-epsilon=8",
        )
        p.add_argument(
            "--max-retries",
            type=int,
            help="reconnection attempts before giving up (default: no limit)",
        )
        p.add_argument(
            "--max-wait-time",
            type=float,
            help="seconds of reconnecting before giving up (default: no limit)",
        )
        p.add_argument(
            "--isolation",
            choices=("subprocess", "process"),
            default="subprocess",
            help="Flower's ClientApp isolation (process: you run flower-superexec)",
        )
        p.add_argument(
            "--port", type=int, default=9094, help="local ClientApp API port (default 9094)"
        )
        p.add_argument("--print", action="store_true", help="print the command, do not run it")
    return p


def main(command: str, argv: Sequence[str]) -> int:
    """``fedsqueeze certs|node-key|device ...``: one line and exit status 2 on a user error."""
    try:
        args = parser(command).parse_args(list(argv))
        if command == "certs":
            creds = make_certificates(args.out_dir, args.hosts or SERVER_HOSTS, args.days)
            print(f"CA certificate (copy to every device): {creds.ca_cert}")
            print(
                f"SuperLink: --ssl-ca-certfile {creds.ca_cert} --ssl-certfile "
                f"{creds.server_cert} --ssl-keyfile {creds.server_key}"
            )
            print(f"keep private: {creds.ca_key}, {creds.server_key}")
            return 0
        if command == "node-key":
            private, public = make_node_key(args.path)
            print(f"private key (stays on this device): {private}")
            print(
                f"public key (register it: flwr supernode register {public} <connection>): {public}"
            )
            return 0
        cmd = supernode_argv(args)
    except DeviceError as err:
        print(f"fedsqueeze: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.print:
        import shlex

        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover  (execv does not return)

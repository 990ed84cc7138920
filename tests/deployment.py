"""Run fedsqueeze through ``flwr run`` on this machine, and clean up after it.

Two context managers, both used by the e2e tests and usable by hand:

- :func:`deployment` starts Flower's Deployment Engine on loopback: one
  ``flower-superlink`` and N SuperNodes, either ``flower-supernode --insecure`` with
  ``--node-config "partition-id=i num-partitions=N"``, or — with ``data_paths`` — the
  documented device command ``fedsqueeze device --data-path FILE`` per device. With
  ``tls=True`` the SuperLink gets a CA-signed certificate from ``fedsqueeze certs`` and
  the SuperNodes ``--root-certificates``; with ``auth=True`` also
  ``--enable-supernode-auth``, a key pair per device (``fedsqueeze node-key``) and
  ``flwr supernode register`` for each. ``Deployment.run`` submits the app with
  ``flwr run <app> <connection> --run-config ...`` and waits for the run.
- :func:`local_simulation` runs ``flwr run <app>`` against the local simulation
  SuperLink that ``flwr run`` starts by itself (detached, so it outlives the command).

Every process these start gets a marker in its environment, which its children
inherit. On exit, also on failure, every process that carries the marker is stopped by
its PID (SIGTERM, then SIGKILL), including the detached local SuperLink and the
SuperExec/ClientApp/ServerApp processes the Flower daemons spawn;
``Handle.survivors()`` must be empty afterwards. State stays in a temporary root:
``FLWR_HOME`` (one per daemon, like separate devices), logs, and the run directory
(``out-dir``). Everything binds to 127.0.0.1 on free ports.

Example::

    with deployment(tmp_path, num_nodes=2) as dep:
        result = dep.run({"num-clients": 2, "clients-per-round": 2, "num-rounds": 2})
    assert not dep.survivors()
    print(result.metrics())
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MARKER = "FEDSQUEEZE_DEPLOYMENT_ID"
"""Environment variable set in every process started here (inherited by its children)."""

ISOLATION_MODES = ("subprocess", "process")


class DeploymentError(RuntimeError):
    """A Flower process failed to start, the run failed, or it did not finish in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config_arg(config: Mapping[str, Any]) -> str:
    """``{"model": "logreg", "num-rounds": 2}`` → ``model = "logreg" num-rounds = 2`` form."""
    parts = []
    for key, value in config.items():
        if not isinstance(value, bool | int | float | str):
            raise TypeError(f"run-config {key!r}: {type(value).__name__} is not bool/int/float/str")
        # tomli_w quotes and escapes strings the way `flwr run --run-config` parses them.
        parts.append(tomli_w.dumps({key: value}).strip().replace(" = ", "=", 1))
    return " ".join(parts)


def base_env(flwr_home: Path, marker: str) -> dict[str, str]:
    """The environment every Flower process here runs with (offline, state in tmp)."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # Otherwise each run does `uv sync` of the app's dependencies (pulls CUDA torch).
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # The Flower daemons launch `flower-superexec`/`flwr-clientapp` by name.
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            MARKER: marker,
        }
    )
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcRef:
    """A process identified by PID and start time (so a reused PID is not mistaken)."""

    pid: int
    start: int
    cmd: str

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.start and stat[0] != "Z"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def marked_processes(marker: str) -> list[ProcRef]:
    """Every live process whose environment carries ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                found.append(ProcRef(int(entry.name), stat[1], cmd.strip()))
    return found


@dataclass
class ProcessGroup:
    """Processes started here plus everything they spawn, all stopped by PID at the end."""

    root: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)
    seen: dict[int, ProcRef] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen:
        """Start a long-running daemon, its output in ``<root>/logs/<name>.log``."""
        proc = self._popen(name, argv, env)
        self.started.append((name, proc, self.root / "logs" / f"{name}.log"))
        self.remember()
        return proc

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen:
        """Start a process that is expected to exit by itself (not checked as a daemon);
        it carries the marker, so :meth:`stop` still stops it if it does not."""
        proc = self._popen(name, argv, env)
        self.remember()
        return proc

    def _popen(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen:
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            return subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def remember(self) -> list[ProcRef]:
        """Record every marked process alive now (daemons spawn children as they go)."""
        current = marked_processes(self.marker)
        for ref in current:
            self.seen.setdefault(ref.pid, ref)
        return current

    def check_running(self) -> None:
        """Raise if a daemon started here has exited."""
        for name, proc, log_path in self.started:
            if proc.poll() is not None:
                raise DeploymentError(
                    f"{name} exited with code {proc.returncode}: {tail(log_path)}"
                )

    def survivors(self) -> list[ProcRef]:
        """Processes started here (directly or not) that are still alive."""
        self.remember()
        return [ref for ref in self.seen.values() if ref.alive()]

    def stop(self, grace: float = 10.0) -> list[ProcRef]:
        """SIGTERM every process started here (daemons first), then SIGKILL what is left."""
        self.remember()
        for _, proc, _ in reversed(self.started):
            _signal(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for _, proc, _ in self.started:
                proc.poll()  # reap our own children so they do not linger as zombies
            alive = self.survivors()
            if not alive:
                break
            if all(p.poll() is not None for _, p, _ in self.started):
                # Daemons are gone: their orphans get a SIGTERM each, by PID.
                for ref in alive:
                    _signal(ref.pid, signal.SIGTERM)
            time.sleep(0.2)
        for ref in self.survivors():
            _signal(ref.pid, signal.SIGKILL)
        for _, proc, _ in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        time.sleep(0.2)
        return self.survivors()


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, on one line (for error messages)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    return " | ".join(text[-lines:]) + f" (log: {path})"


def flwr(
    args: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI; its output is returned, not printed."""
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _json_out(proc: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    start = proc.stdout.find("{")
    try:
        payload = json.loads(proc.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    if proc.returncode != 0 or not payload.get("success"):
        out = " ".join((proc.stdout + proc.stderr).split())[-1500:]
        raise DeploymentError(f"`flwr {what}` failed (exit {proc.returncode}): {out}")
    return payload


# --------------------------------------------------------------------------- runs


def _run_id(log_path: Path) -> int | None:
    """The run id that ``flwr run`` printed ("Successfully started run <id>")."""
    match = re.search(r"Successfully started run (\d+)", log_path.read_text(errors="replace"))
    return int(match.group(1)) if match else None


@dataclass
class RunResult:
    """A finished ``flwr run``: its id, final status, run directory and wall time."""

    run_id: int
    status: str
    run_dir: Path
    wall_s: float
    """From ``flwr run --stream`` being called to it returning (the run has finished)."""
    info: dict[str, Any]
    """The run's entry in ``flwr ls --format json``."""

    def metrics(self) -> list[dict[str, Any]]:
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


@dataclass
class _Runner:
    """Submits runs with ``flwr run`` and waits for them through ``flwr ls``."""

    group: ProcessGroup
    app: Path
    cli_env: dict[str, str]
    connection: list[str]
    """``[]`` for the default connection, else ``[name]``."""
    extra_run_args: list[str] = field(default_factory=list)
    runs: int = 0

    def run(self, run_config: Mapping[str, Any] | None = None, timeout: float = 240.0) -> RunResult:
        """Run the app once; ``out-dir`` defaults to ``<root>/run-<n>``.

        Raises
        ------
        DeploymentError
            ``flwr run`` failed, the run ended in any state but ``finished:completed``,
            a daemon died, or the run did not finish within ``timeout`` seconds.
        """
        self.runs += 1
        config = dict(run_config or {})
        config.setdefault("out-dir", str(self.group.root / f"run-{self.runs}"))
        run_dir = Path(str(config["out-dir"]))
        log_path = self.group.root / "logs" / f"flwr-run-{self.runs}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            str(BIN / "flwr"),
            "run",
            str(self.app),
            *self.connection,
            "--run-config",
            run_config_arg(config),
            *self.extra_run_args,
            # Streams the run's logs and returns when the run has finished: one CLI
            # process instead of polling `flwr ls` (each call re-imports flwr).
            "--stream",
        ]
        t0 = time.monotonic()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                env=self.cli_env,
                cwd=self.group.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    raise DeploymentError(
                        f"`flwr run` did not finish within {timeout:.0f} s; "
                        f"logs in {self.group.root / 'logs'}"
                    )
                self.group.check_running()
                self.group.remember()
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                run_id = _run_id(log_path)
                if run_id is not None:
                    flwr(["stop", str(run_id), *self.connection], self.cli_env, self.group.root)
        wall = time.monotonic() - t0
        run_id = _run_id(log_path)
        if proc.returncode != 0 or run_id is None:
            raise DeploymentError(f"`flwr run` failed (exit {proc.returncode}): {tail(log_path)}")
        listed = flwr(
            ["ls", *self.connection, "--run-id", str(run_id), "--format", "json"],
            self.cli_env,
            self.group.root,
        )
        runs = _json_out(listed, "ls").get("runs", [])
        info: dict[str, Any] = runs[0] if runs else {}
        status = str(info.get("status"))
        if status != "finished:completed":
            raise DeploymentError(
                f"run {run_id} ended as {status!r} ({info.get('status-details')}); "
                f"{tail(log_path, 5)}"
            )
        return RunResult(run_id, status, run_dir, wall, info)


@dataclass
class Deployment(_Runner):
    """A running SuperLink + SuperNodes on loopback (see :func:`deployment`)."""

    superlink_address: str = ""
    num_nodes: int = 0
    isolation: str = "subprocess"
    creds: Path | None = None
    """Directory of the CA, server certificate and device keys (TLS deployments)."""
    auth: bool = False

    def survivors(self) -> list[ProcRef]:
        return self.group.survivors()

    def device(
        self, name: str, data_path: Path, *, register: bool = True, daemon: bool = True
    ) -> subprocess.Popen:
        """Start one more device with ``fedsqueeze device`` (its own key, registered or
        not). ``daemon=False``: the process is expected to exit (e.g. a refused node)."""
        return _start_device(self, name, data_path, register=register, daemon=daemon)


@dataclass
class LocalSimulation(_Runner):
    """``flwr run`` against its own local simulation SuperLink (see :func:`local_simulation`)."""

    superlink_port: int = 0

    def superlinks(self) -> list[ProcRef]:
        """The local SuperLink(s) ``flwr run`` started for this FLWR_HOME (alive now)."""
        log_file = str(Path(self.cli_env["FLWR_HOME"]) / "local-superlink" / "superlink.log")
        return [
            ref
            for ref in self.group.remember()
            if "flower-superlink" in ref.cmd and log_file in ref.cmd
        ]

    def survivors(self) -> list[ProcRef]:
        return self.group.survivors()


def _wait_http_ok(
    url: str, group: ProcessGroup, timeout: float, cafile: Path | None = None
) -> None:
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        group.check_running()
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=1.0, context=context) as res,
        ):
            if res.status == 200:
                return
        time.sleep(0.2)
    raise DeploymentError(f"{url} did not answer within {timeout:.0f} s")


def _register(dep: Deployment, public_keys: Sequence[Path]) -> None:
    """``flwr supernode register KEY.pub deploy`` for every key (in parallel)."""
    procs = [
        subprocess.Popen(
            [str(BIN / "flwr"), "supernode", "register", str(key), "deploy"],
            env=dep.cli_env,
            cwd=dep.group.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for key in public_keys
    ]
    for key, proc in zip(public_keys, procs, strict=True):
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise DeploymentError(
                f"`flwr supernode register {key}` failed: {' '.join(out.split())}"
            )


def _device_argv(dep: Deployment, data_path: Path, key: Path | None, index: int) -> list[str]:
    """The documented device command (``fedsqueeze device``), which execs flower-supernode."""
    argv = [sys.executable, "-m", "fedsqueeze.cli", "device", "--superlink"]
    argv += [dep.superlink_address, "--data-path", str(data_path)]
    argv += ["--partition-id", str(index), "--num-partitions", str(dep.num_nodes)]
    if dep.creds is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(dep.creds / "ca.crt")]
    if key is not None:
        argv += ["--auth-key", str(key)]
    return [*argv, "--port", str(free_port()), "--isolation", dep.isolation]


def _node_env(dep: Deployment, name: str) -> dict[str, str]:
    env = base_env(dep.group.root / f"flwr-{name}", dep.group.marker)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _device_keys(dep: Deployment, names: Sequence[str], register: bool) -> list[Path | None]:
    """Each device's private key (``fedsqueeze node-key``), public keys registered; ``None``
    each without SuperNode authentication."""
    if not dep.auth:
        return [None] * len(names)
    from fedsqueeze.device import make_node_key

    assert dep.creds is not None
    pairs = [make_node_key(dep.creds / f"{name}.key") for name in names]
    if register:
        _register(dep, [public for _, public in pairs])
    return [private for private, _ in pairs]


def _start_device(
    dep: Deployment, name: str, data_path: Path, *, register: bool, daemon: bool
) -> subprocess.Popen:
    (key,) = _device_keys(dep, [name], register)
    argv, env = _device_argv(dep, data_path, key, 0), _node_env(dep, name)
    return dep.group.start(name, argv, env) if daemon else dep.group.spawn(name, argv, env)


@contextlib.contextmanager
def deployment(
    root: Path,
    num_nodes: int = 2,
    *,
    app: Path = REPO,
    isolation: str = "subprocess",
    data_paths: Sequence[Path] | None = None,
    tls: bool = False,
    auth: bool = False,
    startup_timeout: float = 60.0,
) -> Iterator[Deployment]:
    """Start a SuperLink and SuperNodes on 127.0.0.1; stop them all on exit.

    ``data_paths``: one device per file, started with ``fedsqueeze device --data-path``
    (``num_nodes`` is then ignored); otherwise ``num_nodes`` SuperNodes with
    ``partition-id``/``num-partitions`` node configs. ``tls``: the SuperLink serves TLS
    with a certificate from :func:`fedsqueeze.device.make_certificates` and every client
    (SuperNodes, ``flwr``) verifies it against the CA; ``auth`` (implies ``tls``): SuperNode
    authentication, each device with its own key pair, registered before it starts.

    ``isolation`` is the SuperNodes' ClientApp isolation: ``subprocess`` (each SuperNode
    spawns its own SuperExec, which spawns one ``flwr-clientapp`` per message) or
    ``process`` (a separate ``flower-superexec`` per SuperNode, started here, that does
    the same; partition-id nodes only).
    """
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {ISOLATION_MODES}, not {isolation!r}")
    if data_paths is not None:
        num_nodes = len(data_paths)
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, not {num_nodes}")
    if auth and data_paths is None:
        raise ValueError("auth needs data_paths (devices started with `fedsqueeze device`)")
    tls = tls or auth
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup(root)
    port = free_port()
    address = f"127.0.0.1:{port}"
    cli_home = root / "flwr-cli"
    cli_env = base_env(cli_home, group.marker)
    creds = None
    superlink_tls = ["--insecure"]
    connection = "insecure = true\n"
    if tls:
        from fedsqueeze.device import make_certificates

        made = make_certificates(root / "creds", hosts=("127.0.0.1",))
        creds = made.ca_cert.parent
        superlink_tls = [
            "--ssl-ca-certfile",
            str(made.ca_cert),
            "--ssl-certfile",
            str(made.server_cert),
            "--ssl-keyfile",
            str(made.server_key),
        ]
        if auth:
            superlink_tls.append("--enable-supernode-auth")
        connection = f'root-certificates = "{made.ca_cert}"\n'
    # The SuperLink connection lives in the Flower config file, not in pyproject.toml.
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n'
        f'[superlink.deploy]\naddress = "{address}"\n{connection}'
    )
    dep = Deployment(
        group=group,
        app=app,
        cli_env=cli_env,
        connection=["deploy"],
        superlink_address=address,
        num_nodes=num_nodes,
        isolation=isolation,
        creds=creds,
        auth=auth,
    )
    try:
        group.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                *superlink_tls,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
            base_env(root / "flwr-superlink", group.marker),
        )
        scheme = "https" if tls else "http"
        _wait_http_ok(
            f"{scheme}://{address}/health", group, startup_timeout, creds and creds / "ca.crt"
        )
        if data_paths is not None:
            names = [f"device{i}" for i in range(num_nodes)]
            keys = _device_keys(dep, names, register=True)
            for i, (name, path, key) in enumerate(zip(names, data_paths, keys, strict=True)):
                group.start(name, _device_argv(dep, Path(path), key, i), _node_env(dep, name))
        for i in range(num_nodes if data_paths is None else 0):
            node_env = base_env(root / f"flwr-node{i}", group.marker)
            runtime_port = free_port()
            argv = [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                address,
                "--node-config",
                f"partition-id={i} num-partitions={num_nodes}",
                "--host",
                "127.0.0.1",
                "--port",
                str(runtime_port),
                "--isolation",
                isolation,
            ]
            group.start(f"supernode{i}", argv, node_env)
            if isolation == "process":
                group.start(
                    f"superexec{i}",
                    [
                        str(BIN / "flower-superexec"),
                        "--insecure",
                        "--runtime-api-address",
                        f"127.0.0.1:{runtime_port}",
                    ],
                    node_env,
                )
        time.sleep(0.5)
        group.check_running()
        yield dep
    finally:
        group.stop()


@contextlib.contextmanager
def local_simulation(
    root: Path,
    num_supernodes: int,
    *,
    app: Path = REPO,
    cpus_per_client: int = 1,
) -> Iterator[LocalSimulation]:
    """``flwr run <app>`` with the default ``:local:`` connection in a temporary FLWR_HOME.

    The local SuperLink is put on free ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
    ``FLWR_LOCAL_CONTROL_API_PORT``) so it never reuses one already running on this
    machine; on exit it is stopped by its PID with everything it spawned.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup(root)
    port = free_port()
    cli_env = base_env(root / "flwr", group.marker)
    cli_env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(port)
    cli_env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    cli_env.setdefault("RAY_TMPDIR", str(root / "ray"))
    Path(cli_env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
    sim = LocalSimulation(
        group=group,
        app=app,
        cli_env=cli_env,
        connection=[],
        extra_run_args=["--federation-config", federation],
        superlink_port=port,
    )
    try:
        yield sim
    finally:
        group.stop()

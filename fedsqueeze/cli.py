"""The ``fedsqueeze`` command.

``fedsqueeze simulate [CONFIG.toml] [--set key=value ...] [--out DIR] [--resume [DIR]]``
runs a federation in Flower's Simulation Engine and writes the run directory;
``fedsqueeze report DIR`` prints a finished run's result table; ``fedsqueeze export DIR
[--int8] [--out FILE]`` writes its ONNX artifact and ``export.json``; ``fedsqueeze predict
ARTIFACT INPUT.npz`` runs an artifact with onnxruntime and numpy only; ``fedsqueeze device``,
``node-key`` and ``certs`` start a device's SuperNode and make its credentials
(:mod:`fedsqueeze.device`); ``fedsqueeze compare CONFIG.toml... [--seeds N] [--out DIR]`` runs
methods on one federation and writes one table and plots (:mod:`fedsqueeze.compare`).

Errors a user can cause print one line and exit with status 2, before any run
directory is created.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from flwr.server.superlink.fleet.vce.backend.backend import BackendConfig

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_STALLED = 3
"""The clients did not let the run go on: the node handshake failed (no round ran; the run
directory is removed unless it was resumed), or too many rounds in a row had fewer than
``min-clients`` usable replies (run directory kept: ``--resume`` retries)."""

MAX_REASON_CHARS = 400
"""A client's error reason (possibly a whole traceback) is cut to this in the one-line message."""


def one_line(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class UsageError(Exception):
    """A problem with what the user asked for (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsqueeze", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = sub.add_parser("simulate", help="run a simulated federation")
    sim.add_argument("config", nargs="?", help="CONFIG.toml with run-config keys")
    sim.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key (repeatable)",
    )
    sim.add_argument("--out", help="run directory (default runs/<name>-<timestamp>)")
    sim.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="continue the run in DIR (or --out) from its last completed round",
    )
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    rep = sub.add_parser("report", help="print the result table of a run directory")
    rep.add_argument("run_dir")
    exp = sub.add_parser("export", help="export a run's model (or student) to ONNX")
    exp.add_argument("run_dir")
    exp.add_argument("--int8", action="store_true", help="int8 static quantization (QDQ)")
    exp.add_argument("--out", help="artifact path (default RUN_DIR/model[.int8].onnx)")
    exp.add_argument(
        "--fp16-constants",
        action="store_true",
        help="int8 artifact: biases and scales in fp16 (kept at >= 99.5%% top-1 agreement)",
    )
    sub.add_parser("predict", help="run an exported artifact (onnxruntime + numpy only)")
    # Device and credential commands: fedsqueeze/device.py (dispatched in main before
    # anything imports torch).
    sub.add_parser("device", help="start this device's SuperNode (execs flower-supernode)")
    sub.add_parser("node-key", help="a SuperNode authentication key pair (on the device)")
    sub.add_parser("certs", help="CA + SuperLink TLS certificate (on the server)")
    cmp = sub.add_parser("compare", help="run configs on one federation over seeds; one table")
    cmp.add_argument("configs", nargs="+", metavar="CONFIG", help="CONFIG.toml per method")
    cmp.add_argument("--seeds", type=int, default=1, help="seeds per config (default 1)")
    cmp.add_argument("--out", help="output directory (default runs/compare-<timestamp>)")
    cmp.add_argument(
        "--target", type=float, default=0.95, help="fraction of the first config's accuracy"
    )
    cmp.add_argument(
        "--engine",
        choices=("simulation", "sequential"),
        default="simulation",
        help="Flower's Simulation Engine (default) or one process, node after node",
    )
    cmp.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    return parser


def compare(args: argparse.Namespace) -> int:
    """``fedsqueeze compare``: every config and seed in the Simulation Engine, one table."""
    import time

    from fedsqueeze.compare import check_options, load_methods, sequential_runner
    from fedsqueeze.compare import compare as run_compare

    check_options(args.seeds, args.target)
    for method in load_methods(args.configs):  # every config checked before anything runs
        _preflight(method.config)
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")

    def runner(config: Mapping[str, Any], run_dir: Path) -> Mapping[str, Any]:
        _create_run_dir(run_dir, config)
        if args.engine == "sequential":
            return sequential_runner(config, run_dir)
        return simulate(config, run_dir, quiet=True)

    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    _configure_environment(args.verbose)
    print(run_compare(args.configs, args.seeds, out, runner, args.target))
    print(f"written to {out}")
    return 0


def export(args: argparse.Namespace) -> int:
    """``fedsqueeze export``: write the artifact and export.json, print a short summary."""
    from fedsqueeze.models.export import ExportError, export_run

    if not Path(args.run_dir).is_dir():
        raise UsageError(f"{args.run_dir}: no such run directory")
    try:
        report = export_run(
            args.run_dir, out=args.out, int8=args.int8, fp16_constants=args.fp16_constants
        )
    except ExportError as err:
        raise UsageError(str(err)) from None
    for kind, art in report["artifacts"].items():
        lat = art["latency_ms"]
        print(
            f"{kind}: {art['path']}  {art['file_bytes']} B (download {art['download_bytes']} B)  "
            f"acc {art['accuracy_onnxruntime']:.4f} (torch {report['accuracy_torch']:.4f})  "
            f"p50 {lat['batch1']['p50']:.3f} ms @1, {lat['batch32']['p50']:.3f} ms @32"
        )
    print(f"report: {Path(report['artifact']).parent / 'export.json'}")
    return 0


def predict(argv: Sequence[str]) -> int:
    """``fedsqueeze predict``: dispatched before anything imports torch (device installs)."""
    from fedsqueeze.edge import main as edge_main

    try:
        return edge_main(argv)
    except ModuleNotFoundError as err:
        return _missing_extra("predict", err)


COMMAND_EXTRAS = {"simulate": "simulation", "export": "export", "predict": "edge"}
"""The pyproject extra each command needs beyond ``pip install fedsqueeze`` (the device client)."""
OPTIONAL_MODULES = frozenset(
    {"ray", "sklearn", "matplotlib", "flwr_datasets", "datasets", "pyarrow", "mnist1d"}
    | {"onnx", "onnxscript", "onnxruntime"}
)


def _missing_extra(command: str, err: ModuleNotFoundError) -> int:
    """One line naming the extra to install, for a package the light install leaves out."""
    extra = COMMAND_EXTRAS.get(command)
    if extra is None or (err.name or "").split(".")[0] not in OPTIONAL_MODULES:
        raise err
    print(
        f"fedsqueeze: error: `fedsqueeze {command}` needs {err.name}, which the device client "
        f"install leaves out: pip install 'fedsqueeze[{extra}]'",
        file=sys.stderr,
    )
    return EXIT_USAGE


def _resolve(args: argparse.Namespace) -> tuple[dict[str, Any], Path, bool]:
    """The validated config, the run directory and whether this is a resume."""
    from fedsqueeze.config import anchor_paths, load_toml, parse_set_option, resolve_config
    from fedsqueeze.server.app import default_run_dir
    from fedsqueeze.server.rundir import CONFIG, RunDir, check_resume_config

    # Paths are relative to where the command runs; the run directory records them absolute.
    sets = anchor_paths(dict(parse_set_option(s) for s in args.sets))
    if args.resume is not None:
        target = args.resume or args.out
        if not target:
            raise UsageError("--resume needs a run directory (--resume DIR or --out DIR)")
        run_dir = Path(target)
        if not (run_dir / CONFIG).is_file():
            raise UsageError(f"{run_dir}: not a resumable run directory (no {CONFIG})")
        base = load_toml(run_dir / CONFIG)
        base.pop("out-dir", None)
        config = resolve_config(base, sets)
        # A run killed before its first checkpoint restarts from round 1 with its config.
        ckpt = RunDir(run_dir).load_checkpoint()
        if ckpt is None:
            check_resume_config(base, config, 0)
        else:
            check_resume_config(ckpt.config, config, ckpt.completed_round)
        return config, run_dir, True
    layers = [anchor_paths(load_toml(args.config))] if args.config else []
    config = resolve_config(*layers, sets)
    run_dir = Path(args.out) if args.out else default_run_dir(config)
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"{run_dir} exists and is not a directory")
        if run_dir.exists() and any(run_dir.iterdir()):
            resumable = (run_dir / CONFIG).is_file()
            hint = f" (use --resume {run_dir} to continue it)" if resumable else ""
            raise UsageError(f"{run_dir} already exists and is not empty{hint}")
    except OSError as err:  # e.g. a name too long to look up
        raise UsageError(f"cannot create the run directory {run_dir}: {err.strerror}") from None
    return config, run_dir, False


def _preflight(config: Mapping[str, Any]) -> None:
    """Load the data, partition it, build the model (after checking its size on torch's meta
    device) and the privacy calibration: user errors surface here, before the run directory
    exists, rather than inside Ray."""
    import torch

    from fedsqueeze.config import ConfigError
    from fedsqueeze.contracts.checks import check_model_size
    from fedsqueeze.contracts.summable import EncodingError
    from fedsqueeze.federation import new_model, partitions_for
    from fedsqueeze.privacy.errors import PrivacyError
    from fedsqueeze.server.hooks import strategy_chain
    from fedsqueeze.server.secure import SecAggStrategy
    from fedsqueeze.server.strategies import build_chain

    partitions_for(config)
    try:
        with torch.device("meta"):  # shapes only: an absurd model is refused before it allocates
            probe = new_model(config)
    except (NotImplementedError, RuntimeError):  # an init op without a meta kernel
        probe = None
    if probe is not None:
        check_model_size(sum(p.numel() for p in probe.parameters()), str(config["model"]))
    model = new_model(config)
    check_model_size(sum(p.numel() for p in model.parameters()), str(config["model"]))
    for strategy in strategy_chain(build_chain(config)):
        if isinstance(strategy, SecAggStrategy):
            # The field encoding is otherwise first built in round 1 (it needs the model's
            # size): a dp-bits too narrow for it would only fail inside Ray.
            dim = sum(p.numel() for p in model.state_dict().values())
            try:
                strategy._encoding(dim, int(config["clients-per-round"]), 1)
            except (EncodingError, PrivacyError) as err:  # e.g. secagg-bits too narrow
                raise ConfigError(str(err)) from None


def _create_run_dir(run_dir: Path, config: Mapping[str, Any]) -> Path | None:
    """Create the run directory with its ``config.toml`` (so a run killed before its first
    checkpoint can be resumed); the topmost directory created, to remove on a later error.

    Raises
    ------
    UsageError
        The directory cannot be created or written (read-only, a name too long, ...).
    """
    from fedsqueeze.config import to_toml
    from fedsqueeze.server.rundir import CONFIG, RunDir, RunDirWriteError

    created = None
    try:
        created = next((p for p in [*reversed(run_dir.parents), run_dir] if not p.exists()), None)
        run_dir.mkdir(parents=True, exist_ok=True)
        RunDir(run_dir).write_text(CONFIG, to_toml(config))
    except (OSError, RunDirWriteError) as err:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UsageError(f"cannot create the run directory {run_dir}: {reason}") from None
    return created


def _configure_environment(verbose: bool) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        # Flower logs every round at INFO and warns that run_simulation is deprecated
        # (fedsqueeze uses it deliberately: it takes app objects built from a config).
        import flwr.supercore.logger  # noqa: F401  (importing it resets the level to DEBUG)

        logging.getLogger("flwr").setLevel(logging.ERROR)


def simulate(config: Mapping[str, Any], run_dir: Path, quiet: bool = False) -> dict[str, Any]:
    """Run the federation in Flower's Simulation Engine; return the summary."""
    from flwr.simulation import run_simulation
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.server.app import build_server_app

    result: dict[str, Any] = {}
    progress = Progress(
        TextColumn("[bold]round {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=quiet,
    )
    task = progress.add_task("rounds", total=int(config["num-rounds"]), status="starting Ray…")

    def on_round(row: dict[str, Any]) -> None:
        progress.update(
            task,
            completed=row["round"],
            status=f"acc {row['accuracy']:.3f}  up {row['uplink_bytes'] / 1e6:.3f} MB",
        )

    server_app = build_server_app(config, run_dir, on_round=on_round, result=result)
    client_app = build_client_app(config)
    backend: BackendConfig = {
        # Ray actor options (Flower passes them through): an actor whose worker process dies
        # (OOM kill, os._exit) is restarted instead of staying in the pool dead, and a message
        # that meets it dead or restarting is run once more after the restart instead of
        # failing at once (Flower would answer every such message with an error).
        "client_resources": {
            "num_cpus": float(config["client-cpus"]),
            "num_gpus": 0.0,
            "max_restarts": -1,
            "max_task_retries": 1,
        },
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    with progress:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=int(config["num-clients"]),
            backend_config=backend,
        )
    if "summary" not in result:
        raise RuntimeError("the simulation ended without a result (see the log above)")
    summary: dict[str, Any] = result["summary"]
    return summary


def format_table(summary: Mapping[str, Any], run_dir: str | Path) -> str:
    """The short result table printed at the end of a run."""
    from rich.console import Console
    from rich.table import Table

    cfg = summary.get("config", {})
    table = Table(title="fedsqueeze result", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "federation",
        f"{cfg.get('dataset')} / {cfg.get('model')} / {cfg.get('num-clients')} clients "
        f"({cfg.get('partition')}), {cfg.get('strategy')}, codec {cfg.get('codec')}",
    )
    table.add_row("rounds", str(summary["num_rounds"]))
    table.add_row("final accuracy", f"{summary['final_accuracy']:.4f}")
    table.add_row("best accuracy", f"{summary['best_accuracy']:.4f}")
    table.add_row("uplink total", f"{summary['total_uplink_bytes'] / 1e6:.3f} MB")
    table.add_row("downlink total", f"{summary['total_downlink_bytes'] / 1e6:.3f} MB")
    if summary.get("rejected_updates") or summary.get("dropped_clients"):
        table.add_row(
            "rejected / dropped",
            f"{summary.get('rejected_updates', 0)} / {summary.get('dropped_clients', 0)}",
        )
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    table.add_row("run directory", str(run_dir))
    console = Console(width=100, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(table)
    return cap.get()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsqueeze`` command."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["predict"]:
        return predict(words[1:])
    if words[:1] in (["device"], ["node-key"], ["certs"]):
        from fedsqueeze.device import main as device_main

        return device_main(words[0], words[1:])
    from fedsqueeze.compression import CodecError
    from fedsqueeze.config import ConfigError
    from fedsqueeze.data import DatasetError
    from fedsqueeze.models import ModelError
    from fedsqueeze.server.liveness import FederationStalled
    from fedsqueeze.server.rounds import FederationError
    from fedsqueeze.server.rundir import RunDirWriteError

    user_errors = (UsageError, ConfigError, DatasetError, ModelError, CodecError)
    created: Path | None = None
    run_dir: Path | None = None
    try:
        args = _parser().parse_args(argv)
        if args.command == "export":
            return export(args)
        if args.command == "compare":
            return compare(args)
        if args.command == "report":
            print(_report(Path(args.run_dir)))
            return 0
        config, run_dir, resuming = _resolve(args)
        _preflight(config)
        if not resuming:
            created = _create_run_dir(run_dir, config)
        _configure_environment(args.verbose)
        summary = simulate(config, run_dir, quiet=args.quiet)
        print(format_table(summary, run_dir))
        return 0
    except user_errors as err:
        print(f"fedsqueeze: error: {err}", file=sys.stderr)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        return EXIT_USAGE
    except ModuleNotFoundError as err:  # a light (device) install running a server command
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        return _missing_extra(words[0] if words else "", err)
    except RunDirWriteError as err:
        # The failed write left the previous file in place: the last checkpoint is intact.
        print(f"fedsqueeze: error: {err}; resume with --resume {run_dir}", file=sys.stderr)
        return EXIT_FAILURE
    except FederationStalled as err:
        print(f"fedsqueeze: run stopped: {one_line(err)}", file=sys.stderr)
        return EXIT_STALLED
    except FederationError as err:
        # Raised only before round 1 (the node handshake): nothing to keep in a new directory.
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        print(f"fedsqueeze: run stopped before round 1: {one_line(err)}", file=sys.stderr)
        return EXIT_STALLED


def _report(run_dir: Path) -> str:
    """The result table of a finished run directory."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise UsageError(f"{run_dir}: no summary.json (is the run finished?)")
    try:
        summary = json.loads(summary_path.read_text())
        return format_table(summary, run_dir)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"{summary_path}: not a valid run summary ({err!r})") from None


if __name__ == "__main__":
    raise SystemExit(main())

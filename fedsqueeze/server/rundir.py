"""The run directory: config, per-round metrics, checkpoints, final model, summary, plots.

Every file is written atomically (temporary file + fsync + ``os.replace``) so a run killed
at any point leaves either the previous or the new version, never half a file; a write that
fails (a full disk) leaves the previous version and raises :class:`RunDirWriteError`.

Who may read what: ``config.toml``, ``metrics.jsonl``, ``summary.json``, ``model.pt``,
``clients.json`` and the plots are the run's *releases* — under DP they hold only noised
statistics and public parameters, and may be shared. ``checkpoint.npz`` is the server's
*private* state: under central or distributed DP it holds the secret keys of the noise and
of client sampling (whoever reads it can strip central DP's noise and knows which clients
each round used). It is written owner-only (mode 0600, set on the temporary file before a
byte is written, so the key is never readable by others even for an instant) and must not
be shared; deleting it after the run is safe (it is needed only to resume).

The checkpoint holds no code: arrays in an ``.npz`` archive read with
``allow_pickle=False`` and everything else as JSON (:func:`pack_state`), with a format
version. Checkpoints of older versions (``checkpoint.pkl``, a pickle) are refused without
being opened: unpickling a file runs whatever code it names, and run directories travel.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsqueeze.contracts.checks import ConfigError

CHECKPOINT = "checkpoint.npz"
LEGACY_CHECKPOINT = "checkpoint.pkl"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
MODEL = "model.pt"
CLIENTS = "clients.json"

CHECKPOINT_FORMAT = "fedsqueeze-checkpoint"
CHECKPOINT_VERSION = 1
"""Version of the checkpoint layout; a checkpoint of another version is refused."""

PRIVATE_MODE = 0o600
"""File mode of the private checkpoint: owner read/write only."""

RESUMABLE_KEYS = frozenset({"num-rounds", "node-timeout", "client-cpus", "out-dir"})
"""Run-config keys ``--resume`` may change. Every other key shapes the model, the data, the
sampling, the strategy's state or the privacy accounting that the checkpoint continues."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed (corrupt, another format, or a pickle)."""


class ResumeError(ConfigError):
    """A resume that asks for settings the checkpoint cannot continue with."""


class RunDirWriteError(RuntimeError):
    """A run-directory file could not be written (e.g. the disk is full)."""


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically; ``mode`` is set before anything is written.

    Raises
    ------
    RunDirWriteError
        When the file cannot be written; ``path`` keeps its previous content.
    """
    try:
        _atomic_write(path, data, mode)
    except OSError as err:
        reason = err.strerror or str(err)
        hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
        raise RunDirWriteError(f"cannot write {path}: {reason}{hint}") from err


def _atomic_write(path: Path, data: bytes, mode: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- state as JSON + arrays ------------------------------------------------------------------

_ARRAY, _BYTES = "$array", "$bytes"


def pack_state(obj: Any, arrays: dict[str, np.ndarray], where: str = "state") -> Any:
    """``obj`` as JSON, its numpy arrays (and bytes, as uint8 arrays) moved to ``arrays``.

    The checkpoint contract of :class:`~fedsqueeze.server.hooks.RoundHook` state: ``None``,
    bools, ints, floats, strings, lists/tuples and string-keyed dicts of those, numpy arrays
    (not of dtype object) and bytes. Anything else is refused here, at the first checkpoint,
    rather than silently pickled.

    Raises
    ------
    TypeError
        On a value outside the contract; the message names where it is.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj)
    if isinstance(obj, bytes | np.ndarray):
        name = f"state/{len(arrays)}"
        if isinstance(obj, bytes):
            arrays[name] = np.frombuffer(obj, dtype=np.uint8).copy()
            return {_BYTES: name}
        if obj.dtype.hasobject:
            raise TypeError(f"{where}: numpy arrays of dtype object cannot be checkpointed")
        arrays[name] = obj
        return {_ARRAY: name}
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str) or key in (_ARRAY, _BYTES):
                raise TypeError(f"{where}: dict key {key!r} cannot be checkpointed")
            out[key] = pack_state(value, arrays, f"{where}.{key}")
        return out
    if isinstance(obj, list | tuple):
        return [pack_state(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"{where}: {type(obj).__name__} is not checkpoint state (JSON values, bytes, arrays)"
    )


def unpack_state(obj: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(obj, dict):
        if set(obj) == {_ARRAY}:
            return arrays[obj[_ARRAY]]
        if set(obj) == {_BYTES}:
            return arrays[obj[_BYTES]].tobytes()
        return {k: unpack_state(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_state(v, arrays) for v in obj]
    return obj


# ---- the state of Flower's strategies --------------------------------------------------------

_STRATEGY_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")
"""What Flower's stock strategies change between rounds (FedOpt's moments, FedAvgM's momentum
and the arrays they keep); everything else they hold is set from the run config."""


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The between-round state of a stock Flower strategy, as checkpoint state."""
    from flwr.app import ArrayRecord

    from fedsqueeze.contracts.records import from_record

    state: dict[str, Any] = {"class": type(strategy).__name__}
    for name in _STRATEGY_ATTRS:
        if not hasattr(strategy, name):
            continue
        value = getattr(strategy, name)
        if isinstance(value, ArrayRecord):
            state[name] = {"record": from_record(value)}
        elif isinstance(value, dict):
            state[name] = {"dict": dict(value)}
        elif isinstance(value, list):
            state[name] = {"list": list(value)}
        elif value is None:
            state[name] = None
        else:
            raise TypeError(f"{type(strategy).__name__}.{name}: cannot checkpoint {type(value)}")
    return state


def restore_strategy_state(strategy: Any, state: Mapping[str, Any]) -> None:
    """Continue ``strategy`` (built from the run config) from :func:`strategy_state`."""
    from fedsqueeze.contracts.records import to_record

    if state.get("class") != type(strategy).__name__:
        raise CheckpointError(
            f"the checkpoint holds a {state.get('class')} strategy, the config builds "
            f"{type(strategy).__name__}"
        )
    for name in _STRATEGY_ATTRS:
        value = state.get(name)
        if name not in state or not hasattr(strategy, name):
            continue
        if value is None:
            setattr(strategy, name, None)
        elif "record" in value:
            setattr(strategy, name, to_record(value["record"]))
        elif "dict" in value:
            setattr(strategy, name, dict(value["dict"]))
        else:
            setattr(strategy, name, list(value["list"]))


# ---- resuming ----------------------------------------------------------------------------------


def check_resume_config(
    saved: Mapping[str, Any], config: Mapping[str, Any], completed_round: int
) -> None:
    """Refuse a resume whose config changes a key outside :data:`RESUMABLE_KEYS`.

    Raises
    ------
    ResumeError
        Naming the first changed key (or a ``num-rounds`` below the completed rounds).
    """
    from fedsqueeze.config import DEFAULTS

    if str(saved.get("dp", "none")) == "local":
        # Each client's accountant lives in its Context.state, which a restart loses: resumed
        # clients would count their epsilon from zero and the run would understate it.
        raise ResumeError(
            "--resume cannot continue a dp = 'local' run: each client's privacy accountant "
            "lives on the client and a restart loses it, so the resumed run would understate "
            "epsilon — start a new run instead"
        )
    for key in config:
        before = saved.get(key, DEFAULTS.get(key))
        if key in RESUMABLE_KEYS or before == config[key]:
            continue
        allowed = ", ".join(sorted(RESUMABLE_KEYS - {"out-dir"}))
        raise ResumeError(
            f"--resume cannot change {key} (was {before!r}, now {config[key]!r}); "
            f"only {allowed} may change — start a new run instead"
        )
    if int(config["num-rounds"]) < completed_round:
        raise ResumeError(
            f"num-rounds = {config['num-rounds']} but the run already completed "
            f"{completed_round} rounds"
        )


# ---- the run directory -------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Server state after a completed round: enough to continue the run exactly.

    ``strategy_state`` (:func:`strategy_state`), ``metrics`` and ``extra`` (round-hook
    states) are checkpoint state in the sense of :func:`pack_state`.
    """

    completed_round: int
    arrays: dict[str, np.ndarray]
    strategy_state: Any
    metrics: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The ``.npz`` archive: the model under ``model/``, state arrays, and ``meta`` JSON."""
        state_arrays: dict[str, np.ndarray] = {}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "completed_round": int(self.completed_round),
            "model": list(self.arrays),
            "config": pack_state(self.config, state_arrays, "config"),
            "strategy": pack_state(self.strategy_state, state_arrays, "strategy"),
            "metrics": pack_state(self.metrics, state_arrays, "metrics"),
            "extra": pack_state(self.extra, state_arrays, "extra"),
        }
        members = {f"model/{i}": np.asarray(a) for i, a in enumerate(self.arrays.values())}
        members.update(state_arrays)
        members["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **members)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        """Parse :meth:`to_bytes`; never unpickles (object arrays are refused by numpy).

        Raises
        ------
        ValueError
            On a file of another format or version; numpy, zipfile and json raise their
            own errors on a damaged one.
        """
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with loaded as npz:
            meta = json.loads(npz["meta"].tobytes().decode())
            if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not a fedsqueeze checkpoint")
            if meta.get("version") != CHECKPOINT_VERSION:
                raise ValueError(
                    f"checkpoint format version {meta.get('version')!r}, this fedsqueeze "
                    f"reads version {CHECKPOINT_VERSION}"
                )
            members = {name: npz[name] for name in npz.files if name != "meta"}
        arrays = {name: members[f"model/{i}"] for i, name in enumerate(meta["model"])}
        return cls(
            completed_round=int(meta["completed_round"]),
            arrays=arrays,
            strategy_state=unpack_state(meta["strategy"], members),
            metrics=unpack_state(meta["metrics"], members),
            extra=unpack_state(meta["extra"], members),
            config=unpack_state(meta["config"], members),
        )


class RunDir:
    """Reads and writes the files of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.file(name), text.encode())

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2, default=_json_default) + "\n")

    def write_metrics(self, rows: list[Mapping[str, Any]]) -> None:
        text = "".join(json.dumps(dict(r), default=_json_default) + "\n" for r in rows)
        self.write_text(METRICS, text)

    def read_metrics(self) -> list[dict[str, Any]]:
        p = self.file(METRICS)
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        """Write the private checkpoint, owner-only (mode 0600; see the module docstring)."""
        atomic_write(self.file(CHECKPOINT), ckpt.to_bytes(), mode=PRIVATE_MODE)

    def load_checkpoint(self) -> Checkpoint | None:
        """The checkpoint, or None if the run has none yet (it never completed a round).

        Raises
        ------
        CheckpointError
            A pickle checkpoint of an older fedsqueeze (refused unopened), or a file that
            is not a checkpoint of this version.
        """
        p = self.file(CHECKPOINT)
        if not p.exists():
            legacy = self.file(LEGACY_CHECKPOINT)
            if legacy.exists():
                raise CheckpointError(
                    f"{legacy} is a pickle checkpoint of an older fedsqueeze; it is not "
                    "loaded, since unpickling runs any code stored in the file — start a new run"
                )
            return None
        try:
            return Checkpoint.from_bytes(p.read_bytes())
        except Exception as err:  # an untrusted file: any parse failure means unusable
            raise CheckpointError(f"{p}: not a usable checkpoint ({err})") from None

    def save_model(self, arrays: Mapping[str, np.ndarray]) -> None:
        import torch

        buf = io.BytesIO()
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, buf)
        atomic_write(self.file(MODEL), buf.getvalue())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj)}")

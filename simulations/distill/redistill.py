"""One more teacher -> student distillation on finished student runs, on the server side only.

    python simulations/distill/redistill.py RUN_DIR [RUN_DIR ...] [--steps 4000]
        [--schedule cosine] [--public-samples 20000] [--lr 0.003] [--out FILE]

For each finished ``distill = "student"`` run: its final global model (the teacher, in
``model.pt``) is distilled once more into its final student (warm start, from the run's
checkpoint) with the given settings — what a longer last-round distillation
(``distill-final-steps``, ``distill-schedule``, ``distill-public-samples``) adds, measured
without re-running the federation (the teacher does not depend on the student). Uses the
run's own temperature, batch size and seed, the same code as the round hook
(:func:`fedsqueeze.distill.distill`), and only the public transfer slice: no client data and
no test labels (the test split only scores the result). Prints one JSON line per run and a
mean ± sd summary; ``--out`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def redistill(run_dir: Path, steps: int, schedule: str, samples: int, lr: float) -> dict:
    import torch

    from fedsqueeze.config import load_toml, resolve_config
    from fedsqueeze.distill import distill, load_transfer_data, teacher_probs
    from fedsqueeze.federation import dataset_for
    from fedsqueeze.models import build_model
    from fedsqueeze.models.export import load_run_model
    from fedsqueeze.models.weights import evaluate, load_numpy_state

    base = load_toml(run_dir / "config.toml")
    base.pop("out-dir", None)
    cfg = resolve_config(base)
    ds = dataset_for(cfg)
    student, _, which = load_run_model(run_dir)
    if which != "student":
        raise SystemExit(f"{run_dir}: not a student run")
    teacher = build_model(str(cfg["model"]), ds.input_shape, ds.num_classes)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    load_numpy_state(teacher, {k: v.numpy() for k, v in state.items()})
    temperature = float(cfg["distill-temperature"])
    x = load_transfer_data(
        str(cfg["distill-data"]), str(cfg["dataset"]), ds.input_shape, builtin_samples=samples
    )
    before = evaluate(student, ds.x_test, ds.y_test)[1]
    t0 = time.process_time()
    distill(
        student,
        x,
        teacher_probs(teacher, x, temperature),
        steps=steps,
        temperature=temperature,
        lr=lr,
        batch_size=int(cfg["distill-batch-size"]),
        seed=int(cfg["seed"]) * 100_003 + int(cfg["num-rounds"]) + 1,
        schedule=schedule,
    )
    teacher_acc = evaluate(teacher, ds.x_test, ds.y_test)[1]
    after = evaluate(student, ds.x_test, ds.y_test)[1]
    return {
        "run": str(run_dir),
        "secagg": bool(cfg["secagg"]),
        "teacher": teacher_acc,
        "student_before": before,
        "student_after": after,
        "gap_before_pp": round(100 * (teacher_acc - before), 2),
        "gap_after_pp": round(100 * (teacher_acc - after), 2),
        "distill_s": round(time.process_time() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    parser.add_argument("--public-samples", type=int, default=20000)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = []
    for run in args.runs:
        rows.append(redistill(run, args.steps, args.schedule, args.public_samples, args.lr))
        print(json.dumps(rows[-1]), flush=True)
    for secagg in (False, True):
        sel = [r for r in rows if r["secagg"] == secagg]
        if not sel:
            continue
        for key in ("gap_before_pp", "gap_after_pp"):
            vals = [r[key] for r in sel]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            print(
                f"secagg={secagg} {key}: {statistics.mean(vals):.2f} ± {sd:.2f} ({len(vals)} runs)"
            )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "settings": vars(args)
                    | {"runs": [str(r) for r in args.runs], "out": str(args.out)},
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

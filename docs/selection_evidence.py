"""Does selection pick better checkpoints? The README's table, measured on the two tiny-GPT examples.

Runs ``examples/pretrain_tiny_gpt.py`` (Hugging Face Trainer, the ``make demo`` run) and
``examples/lightning_tiny_gpt.py`` (Lightning) with ``holdout=0.5`` for several training seeds (the
model's initialisation and the batch order; the tasks' examples are the same in every run), then reads
each run's ``best.json`` evidence: on the confirmation half, which selection never read, the chosen
checkpoint (the best window average) against the raw checkpoint with the best selection score (the
naive pick) and the final raw checkpoint, with the paired bootstrap intervals at the chosen step.

Run it (about 8 minutes per seed on 2 CPU cores)::

    make selection-evidence          # seeds 0 1 2, table to docs/selection_evidence.md
    python docs/selection_evidence.py --seeds 0 --out runs/selection_evidence
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

EXAMPLES = {
    "demo (Hugging Face Trainer)": "examples/pretrain_tiny_gpt.py",
    "Lightning tiny GPT": "examples/lightning_tiny_gpt.py",
}


def run(example: str, seed: int, out: Path) -> dict:
    """Run one example with one seed (unless its run directory already holds a result); its evidence."""
    best = out / "stability" / "best.json"
    if not best.exists():
        subprocess.run(
            [sys.executable, example, "--seed", str(seed), "--out", str(out), "--quiet"], check=True
        )
    pointer = json.loads(best.read_text())
    evidence = pointer.get("evidence")
    if not isinstance(evidence, dict) or evidence.get("holdout") is None:
        raise SystemExit(f"{best} holds no confirmation-half evidence: was the run made with holdout=0.5?")
    return evidence


def interval_text(interval: dict | None) -> str:
    if not interval:
        return "n/a"
    return f"{interval['estimate']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def row(name: str, seed: int, evidence: dict) -> str:
    chosen, naive, final = evidence["chosen"], evidence["naive"], evidence["final_raw"]
    intervals = evidence["intervals"]
    return (
        f"| {name} | {seed} | {chosen['variant']} @ {chosen['step']} | {chosen['confirmation_score']:.3f} "
        f"| raw @ {naive['step']}: {naive['confirmation_score']:.3f} "
        f"| raw @ {final['step']}: {final['confirmation_score']:.3f} | {evidence['regret']:.3f} "
        f"| {interval_text(intervals.get('avg_minus_raw'))} "
        f"| {interval_text(intervals.get('ens_minus_raw'))} |"
    )


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/selection_evidence"))
    parser.add_argument("--table", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()

    lines = [
        "| example | seed | chosen | chosen, confirmation | naive pick, confirmation "
        "| final raw, confirmation | regret | avg − raw at the chosen step | ens − raw at the chosen step |",
        "|---|---:|---|---:|---|---|---:|---|---|",
    ]
    summary = []
    for name, example in EXAMPLES.items():
        gains_naive, gains_final = [], []
        for seed in args.seeds:
            out = args.out / f"{Path(example).stem}-seed{seed}"
            evidence = run(example, seed, out)
            lines.append(row(name, seed, evidence))
            chosen = evidence["chosen"]["confirmation_score"]
            gains_naive.append(chosen - evidence["naive"]["confirmation_score"])
            gains_final.append(chosen - evidence["final_raw"]["confirmation_score"])
        summary.append(
            f"- {name}: chosen − naive pick {mean(gains_naive):+.3f} on average over {len(args.seeds)} seeds "
            f"(per seed {', '.join(f'{g:+.3f}' for g in gains_naive)}); chosen − final raw "
            f"{mean(gains_final):+.3f} ({', '.join(f'{g:+.3f}' for g in gains_final)})"
        )
    text = "\n".join([*lines, "", *summary]) + "\n"
    print(text)
    if args.table is not None:
        args.table.write_text(text)


if __name__ == "__main__":
    main()

"""The ``checkpoint-stability`` command: ``report``, ``average``, ``analyze``, ``best`` and ``follow``.

Errors a user can fix (a missing or mismatched checkpoint, a bad option, a run directory that holds
another analysis) are one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
Anything else (a bug in a task, say) keeps its traceback. ``best`` exits 1 when the run has no best
model yet, so a script can tell "not yet" from a mistake. ``follow`` exits 0 when it stops, whether
training had ended or ``--timeout`` passed; its last line says which.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from checkpoint_stability.errors import CheckpointStabilityError

logger = logging.getLogger("checkpoint_stability.offline.cli")

PROG = "checkpoint-stability"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DEFAULT_TEXT_BLOCK_SIZE = 128
DEFAULT_TEXT_MAX_TOKENS = 2048
# The files of a run directory; one of them must be there for `best` to call a folder a run directory.
RUN_DIRECTORY_FILES = ("run.json", "history.jsonl", "best.json", "analysis.json")

STEPS_HELP = (
    "Steps: a checkpoint named checkpoint-<N> (as the Hugging Face Trainer saves them) or step-<N> is "
    "step N, else the global_step of a trainer_state.json beside its weights; the series is then sorted "
    "by step. If any checkpoint has no step, all keep the order given and are numbered 1..N."
)


class CliError(CheckpointStabilityError):
    """A problem with the command line itself; reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Checkpoint averaging and ensembles for steadier downstream evaluation during LLM pretraining "
            "(Nishida et al., arXiv 2510.04848)."
        ),
        epilog=(
            f"Examples:\n"
            f"  {PROG} average out/checkpoint-800 out/checkpoint-900 out/checkpoint-1000 -o out/avg-last3\n"
            f"  {PROG} analyze out/checkpoint-* -o runs/offline --windows 1,2,5 --tasks my_tasks:build\n"
            f"  {PROG} analyze out/checkpoint-* -o runs/offline --windows 1,2,5 --text heldout.txt\n"
            f"  {PROG} report runs/offline\n"
            f"  {PROG} best runs/exp/stability\n"
            f"  {PROG} follow runs/exp/stability --tasks my_tasks:build --model my_model:build\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    report = commands.add_parser(
        "report",
        help="write the Markdown report and plots of a run directory",
        description="Write report.md and PNG plots from a run directory's history (live run or analyze).",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding history.jsonl")
    report.add_argument(
        "-o", "--output-dir", metavar="DIR", help="where to write the report (default: RUN_DIR/report)"
    )

    average = commands.add_parser(
        "average",
        help="write the uniform average of saved checkpoints",
        description=(
            "Write the uniform average of saved checkpoints: floating-point and complex tensors are "
            "averaged (summed in float64, rounded back to the stored dtype), the others are taken from the "
            "last checkpoint. Tensors are streamed one at a time, so memory stays near one model (one "
            "shard, if sharded) whatever the number of checkpoints. The output has the last checkpoint's "
            "format: a model directory gives a directory (config and tokenizer files copied), sharded "
            "weights give the same shards and index, a .safetensors file gives a file. Only safetensors is "
            "read, never pickle. Side files that link out of the checkpoint directory (other than into its "
            "own Hugging Face cache blobs) are skipped with a warning. OUT may not contain, be or lie "
            "inside an input."
        ),
    )
    average.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="a model directory (model.safetensors or model.safetensors.index.json), a .safetensors "
        "file, or a safetensors index .json",
    )
    average.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory or file")
    average.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it holds a previous average written by this command (anything else is refused); "
        "the old OUT stays whole until the new one is renamed over it",
    )
    average.add_argument("--no-progress", action="store_true", help="no progress bar")

    analyze = commands.add_parser(
        "analyze",
        help="evaluate raw checkpoints, window averages and window ensembles of a saved series",
        description=(
            "The paper's analysis of a saved series of checkpoints: each checkpoint evaluated raw (window "
            "1), and for each window size w > 1 the average of the last min(w, k) checkpoints (avg) and the "
            "ensemble of their outputs (ens). Writes RUN_DIR/history.jsonl and examples/ as the live "
            "monitor does (records carry window and n_models), then the report. Rerunning skips what "
            "RUN_DIR already holds; checkpoints may be added after the last one, and windows added."
        ),
        epilog=STEPS_HELP,
    )
    analyze.add_argument(
        "checkpoints", nargs="+", metavar="CKPT", help="the series: model directories, .safetensors files"
    )
    analyze.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="the run directory")
    analyze.add_argument(
        "--windows", default="1,2,5,10,20", metavar="LIST", help="window sizes (default: 1,2,5,10,20)"
    )
    add_task_arguments(
        analyze,
        text_help="a held-out plain-text file (UTF-8): next-token accuracy on it, tokenized with the "
        "checkpoints' own tokenizer, is a task named after the file's stem; repeatable",
        tokenizer_help="tokenizer directory for lm-eval tasks (default: the first checkpoint, or "
        "--model-config) and for --text (default: every checkpoint's own, which must agree; --model-config's "
        "for checkpoints without one)",
    )
    analyze.add_argument(
        "--model-config",
        metavar="DIR",
        help="a Hugging Face config directory to build the model from (needed for bare .safetensors files)",
    )
    analyze.add_argument("--device", default="cpu", help="device to evaluate on (default: cpu)")
    analyze.add_argument(
        "--ensemble", choices=("vote", "mean_prob"), default="vote", help="how ens combines outputs"
    )
    analyze.add_argument(
        "--horizon", type=int, default=20, help="trailing evaluations for live MTV and IS (default: 20)"
    )
    analyze.add_argument(
        "--similarity", choices=("exact", "char_f1"), default="exact", help="IS similarity (default: exact)"
    )
    analyze.add_argument(
        "--holdout",
        type=float,
        default=None,
        metavar="H",
        help="hold out this share of every task's examples (0 < H < 1): each record also carries its score "
        "on the selection and the confirmation half, as a live run with holdout=H does",
    )
    analyze.add_argument("--no-progress", action="store_true", help="no progress bar")
    analyze.add_argument("--no-report", action="store_true", help="do not write the report at the end")

    best = commands.add_parser(
        "best",
        help="show the best model a run exported (what best.json says)",
        description=(
            "Show what RUN_DIR/best.json says: the step and variant of the best model, the snapshot steps "
            "it averages, its score(s), the metric it was selected on, and where its export is. Read-only: "
            "works on a finished run or one still training. Exit code 0 when there is a best, 1 when the "
            "run has none yet, 2 when RUN_DIR is not a run directory or best.json is damaged."
        ),
        epilog="For Lightning and Hugging Face runs RUN_DIR is the 'stability' folder the callback writes.",
    )
    best.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (the monitor's dirpath)")
    best.add_argument("--json", action="store_true", help="print best.json's content as JSON")

    follow = commands.add_parser(
        "follow",
        usage=f"{PROG} follow RUN_DIR (--tasks MODULE:FUNCTION | --text FILE | --lm-eval NAMES ...)\n"
        "           (--model MODULE:FUNCTION | --model-config DIR) [--device DEVICE] [--timeout SECONDS]\n"
        "           [--poll SECONDS] [--export-prefix PREFIX] [--quiet]",
        help="evaluate a background-evaluated run's snapshots as training writes them",
        description=(
            "The evaluator of a run trained with evaluation='background': training only snapshots into "
            "RUN_DIR/buffer/, and this command, in another process (another core, GPU or machine that sees "
            "RUN_DIR), evaluates every snapshot in step order -- raw, window average, ensemble, MTV and IS, "
            "best model and export -- writing the same history, examples, best.json and export as an inline "
            "run would. Use it to keep evaluation off the training path. It runs until training has ended "
            "and every snapshot is evaluated (or --timeout); stopped or killed, rerunning it goes on from "
            "the last step it finished (RUN_DIR/evaluator.json). One evaluator per run directory. The "
            "window, ensemble, selection and other settings come from the training side (RUN_DIR/run.json)."
        ),
        epilog=(
            "For Lightning and Hugging Face runs RUN_DIR is the 'stability' folder the callback writes. "
            "--model must build the module that was trained (a LightningModule, say; --export-prefix names "
            "the model inside it); --model-config fits runs whose trained module is the Hugging Face model "
            "itself (the Hugging Face Trainer)."
        ),
    )
    follow.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of a background-evaluated run")
    add_task_arguments(
        follow,
        text_help="a held-out plain-text file (UTF-8): next-token accuracy on it, tokenized with --tokenizer "
        "(or --model-config's tokenizer), is a task named after the file's stem; repeatable",
        tokenizer_help="tokenizer directory for --text and lm-eval tasks (default: --model-config's, if "
        "it holds one); also saved beside Hugging Face exports",
    )
    follow.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="a function returning the trained architecture as a torch.nn.Module (its weights are replaced)",
    )
    follow.add_argument(
        "--model-config",
        metavar="DIR",
        help="instead of --model: a Hugging Face config directory (AutoModelForCausalLM.from_config)",
    )
    follow.add_argument("--device", default="cpu", help="device to evaluate on (default: cpu)")
    follow.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop after this many seconds with no new snapshot (default: wait as long as training runs)",
    )
    follow.add_argument(
        "--poll",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between looks at the buffer (default: 1)",
    )
    follow.add_argument(
        "--export-prefix",
        default="",
        metavar="PREFIX",
        help="state-dict prefix of the exported model inside the trained module, e.g. 'model.' "
        "(default: all of it)",
    )
    follow.add_argument(
        "--quiet", action="store_true", help="no line per snapshot: only the summary at the end"
    )
    return parser


def add_task_arguments(parser: argparse.ArgumentParser, *, text_help: str, tokenizer_help: str) -> None:
    """The options that say which tasks to run (``analyze`` and ``follow`` share them)."""
    parser.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="a function returning a list of tasks, e.g. my_tasks:build (a module importable from the "
        "current directory) or path/to/tasks.py:build; repeatable",
    )
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="FILE",
        help=text_help,
    )
    parser.add_argument(
        "--text-name",
        action="append",
        default=[],
        metavar="NAME",
        help="the task name for a --text file instead of its stem; repeatable, one per --text, in order",
    )
    parser.add_argument(
        "--text-block-size",
        type=int,
        metavar="N",
        help=f"--text: tokens per sequence the text is cut into (default: {DEFAULT_TEXT_BLOCK_SIZE}, or the "
        "model's context length if shorter; at most the context length)",
    )
    parser.add_argument(
        "--text-max-tokens",
        type=int,
        default=DEFAULT_TEXT_MAX_TOKENS,
        metavar="N",
        help=f"--text: predicted tokens kept, the text's first (default: {DEFAULT_TEXT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--lm-eval", metavar="NAMES", help="comma-separated lm-evaluation-harness task names (needs lm-eval)"
    )
    parser.add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="a directory of lm-eval task YAMLs"
    )
    parser.add_argument("--limit", type=float, help="lm-eval: first N documents (N < 1: a fraction)")
    parser.add_argument("--num-fewshot", type=int, help="lm-eval: number of few-shot examples")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="lm-eval and --text: sequences per batch (default: 8)"
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help=tokenizer_help,
    )


# ------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 usage or input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or argparse's own usage error (code 2)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    _show_library_messages()
    from checkpoint_stability.storage.checkpoint_files import CheckpointError

    # ValueError covers CheckpointError and AnalysisError; OSError a missing file or a full disk.
    from checkpoint_stability.storage.run_lock import RunDirectoryLocked

    user_errors: tuple[type[BaseException], ...] = (
        CliError,
        CheckpointError,
        ValueError,
        OSError,
        RunDirectoryLocked,
    )
    try:
        commands = {
            "report": _report,
            "average": _average,
            "analyze": _analyze,
            "best": _best,
            "follow": _follow,
        }
        return commands[args.command](args)
    except user_errors as error:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; rerun the same command to resume" if args.command in ("analyze", "follow") else ""
        print(f"{PROG} {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _show_library_messages() -> None:
    # The library logs warnings and progress notes; a command line shows them once, without the root
    # logger's configuration (which would also turn on every dependency's messages).
    logger = logging.getLogger("checkpoint_stability")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# ------------------------------------------------------------------------------------------------ commands


def _report(args) -> int:
    try:
        from checkpoint_stability.reporting.report import write_report
    except ModuleNotFoundError as error:
        if error.name != "checkpoint_stability.reporting.report":
            raise
        raise CliError(
            "this installation has no report module (checkpoint_stability.reporting.report)"
        ) from error
    try:
        path = write_report(args.run_dir, output_dir=args.output_dir)
    except ImportError as error:  # matplotlib, an optional extra
        raise CliError(str(error)) from None
    print(f"report written to {path}")
    return 0


def _average(args) -> int:
    from checkpoint_stability.storage.checkpoint_files import average_checkpoints

    out = average_checkpoints(
        args.checkpoints, args.output, overwrite=args.overwrite, progress=not args.no_progress
    )
    print(f"averaged {len(args.checkpoints)} checkpoints into {out}")
    return 0


def _analyze(args) -> int:
    from checkpoint_stability.offline.analysis import analyze, huggingface_model_factory, order_series

    windows = parse_windows(args.windows)
    if args.horizon < 2:
        raise CliError(f"--horizon must be at least 2, got {args.horizon}")
    if args.holdout is not None and not 0 < args.holdout < 1:
        raise CliError(f"--holdout must be a number strictly between 0 and 1, got {args.holdout}")
    if not args.tasks and not args.lm_eval and not args.text:
        raise CliError("no tasks: pass --tasks MODULE:FUNCTION, --lm-eval NAMES and/or --text FILE")
    series = order_series(args.checkpoints)
    first = series.checkpoints[0]
    if args.model_config:
        model_factory = huggingface_model_factory(args.model_config, from_config=True, device=args.device)
    elif first.layout != "file" and first.directory is not None:
        model_factory = huggingface_model_factory(first.directory, device=args.device)
    else:
        raise CliError(
            f"{first.path} is a bare .safetensors file: pass --model-config DIR (a Hugging Face config "
            "directory) to say which model it belongs to"
        )
    tasks = []
    for spec in args.tasks:
        tasks.extend(load_tasks(spec))
    if args.text:
        tasks.extend(_text_tasks(args, series.checkpoints))
    if args.lm_eval:
        tokenizer = _tokenizer(args, first.directory)
        tasks.extend(_lm_eval_tasks(args, tokenizer))
    result = analyze(
        series.checkpoints,
        tasks,
        args.output,
        windows=windows,
        model_factory=model_factory,
        ensemble=args.ensemble,
        horizon=args.horizon,
        similarity=args.similarity,
        progress=not args.no_progress,
        report=not args.no_report,
        holdout=args.holdout,
    )
    steps = result.steps
    numbered = ", by position" if series.step_source == "positions" else ""
    print(
        f"analysed {len(steps)} checkpoints (steps {steps[0]}..{steps[-1]}{numbered}) with {len(tasks)} "
        f"task(s), windows {','.join(map(str, windows))}: {result.evaluations} task evaluation(s) run, "
        f"{result.skipped} already in {result.run_dir}; {result.records_written} records "
        f"written to {result.run_dir / 'history.jsonl'}"
        + (f"; report: {result.report}" if result.report is not None else "")
    )
    return 0


def _best(args) -> int:
    import json

    from checkpoint_stability.selection import BEST_FILE, read_best

    run_dir = Path(args.run_dir)
    _check_run_directory(run_dir)
    best = read_best(run_dir)  # DamagedJSONError (a ValueError) names the file: exit 2
    if best is None:
        if _is_analysis(run_dir):
            why = f"no best model (no {BEST_FILE}): analyze evaluates a series and selects none"
        else:
            why = f"no best model yet (no {BEST_FILE})"
        print(f"{PROG} best: {run_dir} has {why}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(best, indent=1))
        return 0
    print("\n".join(describe_best(best, run_dir)))
    return 0


def describe_best(best: dict, run_dir: Path) -> list[str]:
    from checkpoint_stability.run_summary import evidence_lines

    """The lines ``checkpoint-stability best`` prints for a ``best.json``."""
    variant, n = best["variant"], len(best["steps"])
    what = {
        "avg": f"the average of the window's {n} snapshot(s)",
        "raw": "the model as trained at that step",
        "ens": f"the ensemble of the window's {n} snapshot(s)",
    }.get(variant, "")
    lines = [
        f"step:     {best['step']}",
        f"variant:  {variant}" + (f" ({what})" if what else ""),
        f"steps:    {_steps(best['steps'])}",
    ]
    if best["score"] is None:
        lines.append("score:    none (a run without tasks: the latest model, exported as it ended)")
    else:
        mode = best.get("mode") or "max"
        lines.append(
            f"score:    {best['score']:.6g} on {best.get('metric') or 'mean'!r} "
            f"({'highest' if mode == 'max' else 'lowest'} wins, select={best.get('select')!r})"
        )
    scores = best.get("scores")
    if isinstance(scores, dict) and scores:
        lines.append("scores:   " + ", ".join(f"{task} {_number(score)}" for task, score in scores.items()))
    if best.get("path") is None:
        lines.append("export:   none (an ensemble is not one set of weights)")
    else:
        lines.append(f"export:   {run_dir / best['path']}")
    for entry in best.get("kept") or []:
        if isinstance(entry, dict):
            where = run_dir / entry["path"] if isinstance(entry.get("path"), str) else "no export"
            lines.append(
                f"kept:     step {entry.get('step')} {entry.get('variant')}, selected under other "
                f"settings: {where}"
            )
    if best.get("selection_score") is not None:
        lines.append(f"selection half: {best['selection_score']:.6g} (what selection compared; holdout)")
    evidence = best.get("evidence")
    if isinstance(evidence, dict):
        try:
            lines += [line.removeprefix("  ") for line in evidence_lines(evidence)]
        except (KeyError, TypeError, ValueError):  # a hand-edited pointer: the rest still prints
            lines.append("evidence: present but not readable")
    return lines


def _steps(steps: list) -> str:
    shown = [str(s) for s in steps]
    return ", ".join(shown if len(shown) <= 8 else [*shown[:3], "...", *shown[-3:]])


def _number(value) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


def _check_run_directory(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise CliError(f"{run_dir} is not a directory" if run_dir.exists() else f"no directory {run_dir}")
    if any((run_dir / name).exists() for name in RUN_DIRECTORY_FILES):
        return
    hint = ""
    if any((run_dir / "stability" / name).exists() for name in RUN_DIRECTORY_FILES):
        hint = f"; did you mean {run_dir / 'stability'}?"
    files = ", ".join(RUN_DIRECTORY_FILES)
    raise CliError(f"{run_dir} is not a run directory (it holds none of {files}){hint}")


def _is_analysis(run_dir: Path) -> bool:
    return (run_dir / "analysis.json").exists() and not (run_dir / "run.json").exists()


def _follow(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CliError(f"{run_dir} is not a directory" if run_dir.exists() else f"no directory {run_dir}")
    if args.timeout is not None and not args.timeout >= 0:  # `not >=`: NaN is refused too
        raise CliError(f"--timeout must be a number of seconds >= 0, got {args.timeout}")
    if not 0 < args.poll < float("inf"):
        raise CliError(f"--poll must be a number of seconds > 0, got {args.poll}")
    if args.model and args.model_config:
        raise CliError("pass either --model MODULE:FUNCTION or --model-config DIR, not both")
    if not args.model and not args.model_config:
        raise CliError(
            "no model: pass --model MODULE:FUNCTION (a function returning the trained architecture) or "
            "--model-config DIR (a Hugging Face config directory); the snapshots' weights are loaded into it"
        )
    if not args.tasks and not args.lm_eval and not args.text:
        raise CliError("no tasks: pass --tasks MODULE:FUNCTION, --lm-eval NAMES and/or --text FILE")
    # Before building tasks and a model (an lm-eval download, a large model): is there anything to follow?
    _check_background_run(run_dir)
    library = logging.getLogger("checkpoint_stability")
    level = library.level
    if args.quiet:  # warnings still show; the notes (the report written, ...) do not
        library.setLevel(logging.WARNING)
    try:
        result = _run_evaluator(args, run_dir)
    finally:
        library.setLevel(level)  # main() may be called again in this process (tests, notebooks)
    print(describe_follow(run_dir, result))
    return 0


def _run_evaluator(args, run_dir: Path):
    """Build the tasks and the model, then follow ``run_dir`` until it is done (or ``--timeout``)."""
    from checkpoint_stability.evaluator import BackgroundEvaluator, ModelMismatchError

    tasks = []
    for spec in args.tasks:
        tasks.extend(load_tasks(spec))
    if args.text:
        tasks.extend(_text_tasks(args, []))
    if args.lm_eval:
        tasks.extend(_lm_eval_tasks(args, _tokenizer(args, None)))
    tokenizer_dir = args.tokenizer or args.model_config
    processing_class = None  # saved beside Hugging Face exports; without it the monitor takes a task's
    if tokenizer_dir and _has_tokenizer(Path(tokenizer_dir)):
        processing_class = _load_tokenizer(Path(tokenizer_dir))
    try:
        evaluator = BackgroundEvaluator(
            run_dir,
            tasks,
            _follow_model(args),  # built only once run.json is read and agreed with
            console=not args.quiet,
            export_prefix=args.export_prefix,
            processing_class=processing_class,
            poll_interval=args.poll,
        )
        return evaluator.run(timeout=args.timeout)
    except ModelMismatchError as error:
        flag = f"--model {args.model}" if args.model else f"--model-config {args.model_config}"
        raise CliError(f"{flag} builds a model the snapshots do not fit: {error}") from None


def _check_background_run(run_dir: Path) -> None:
    """Refuse, with what to do instead, a directory no ``evaluation="background"`` run wrote."""
    from checkpoint_stability.evaluator import NotBackgroundRunError
    from checkpoint_stability.run_directory import RUN_FILE, read_run_record

    record = read_run_record(run_dir)
    if record is not None and record.get("evaluation") == "background":
        return
    how = (
        "start training with StabilityCallback(..., evaluation='background') or "
        "StabilityMonitor(..., evaluation='background') and follow its run directory"
    )
    if record is not None:
        raise NotBackgroundRunError(
            f"{run_dir} is not a background-evaluated run: its {RUN_FILE} says it was evaluated inline, by "
            f"the training process itself, so there is nothing to follow; {how}"
        )
    if (run_dir / "stability" / RUN_FILE).exists():
        raise NotBackgroundRunError(
            f"{run_dir} has no {RUN_FILE}; did you mean {run_dir / 'stability'}? (the callbacks' run "
            "directory)"
        )
    raise NotBackgroundRunError(
        f"{run_dir} is not a background-evaluated run directory (no readable {RUN_FILE}): {how}"
    )


def _follow_model(args):
    """A function building the model the snapshots are loaded into, on ``--device``."""
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise CliError(f"--device {args.device}: {error}") from None
    if args.model_config:
        from checkpoint_stability.offline.analysis import huggingface_model_factory

        return huggingface_model_factory(args.model_config, from_config=True, device=device)
    spec = args.model
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise CliError(f"--model wants MODULE:FUNCTION (e.g. my_model:build), got {spec!r}")
    function = getattr(_import(module_name, "--model"), function_name, None)
    if not callable(function):
        raise CliError(f"--model {spec}: {module_name} has no function {function_name!r}")

    def build() -> torch.nn.Module:
        model = function()
        if not isinstance(model, torch.nn.Module):
            raise CliError(
                f"--model {spec}: {function_name}() returned {type(model).__name__}, not a torch.nn.Module"
            )
        try:
            return model.to(device)
        except (RuntimeError, AssertionError) as error:  # torch's "not compiled with CUDA" is an assert
            raise CliError(f"--device {args.device}: {_one_line(error)}") from None

    return build


def describe_follow(run_dir: Path, result) -> str:
    """The line ``checkpoint-stability follow`` ends with, for a :class:`FollowResult`."""
    import statistics

    def count(n: int, noun: str) -> str:
        return f"{n} {noun}" + ("" if n == 1 else "s")

    evaluated = result.evaluated
    line = f"followed {run_dir}: evaluated {count(len(evaluated), 'snapshot')}"
    if len(evaluated) == 1:
        line += f" (step {evaluated[0]})"
    elif evaluated:
        line += f" (steps {evaluated[0]}..{evaluated[-1]})"
    line += f", skipped {count(len(result.skipped), 'dropped one')}"
    if result.skipped:
        line += f" (steps {_steps(result.skipped)})"
    line += "; training closed" if result.closed else "; training not closed (rerun follow to go on)"
    if result.lags:
        line += f"; lag median {statistics.median(result.lags):.2f} s, max {max(result.lags):.2f} s"
    return line


# ------------------------------------------------------------------------------------------------ helpers


def parse_windows(text: str) -> list[int]:
    """``"1,2,5"`` → ``[1, 2, 5]``.

    >>> parse_windows("5, 1,2")
    [1, 2, 5]
    """
    try:
        windows = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"--windows wants comma-separated integers >= 1, got {text!r}") from None
    if not windows or min(windows) < 1:
        raise CliError(f"--windows wants comma-separated integers >= 1, got {text!r}")
    return sorted(set(windows))


def load_tasks(spec: str) -> list:
    """Call the function a ``MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``) spec names; its tasks.

    The module is imported with the current directory on ``sys.path``, so a module beside the command
    works as it would in ``python -c``. The function takes no arguments and returns a list of tasks.
    """
    from checkpoint_stability.tasks.base import validate_tasks

    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise CliError(f"--tasks wants MODULE:FUNCTION (e.g. my_tasks:build), got {spec!r}")
    module = _import(module_name, "--tasks")
    function = getattr(module, function_name, None)
    if not callable(function):
        raise CliError(f"--tasks {spec}: {module_name} has no function {function_name!r}")
    tasks = function()
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, (list, tuple)):
        raise CliError(
            f"--tasks {spec}: {function_name}() returned {type(tasks).__name__}, not a list of tasks"
        )
    try:
        return validate_tasks(list(tasks))
    except ValueError as error:
        raise CliError(f"--tasks {spec}: {error}") from None


def _import(module_name: str, flag: str):
    """The module a ``MODULE:FUNCTION`` spec of ``flag`` names (a dotted name or a .py path)."""
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise CliError(f"{flag}: no file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise CliError(f"{flag}: {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing module of the spec itself is a usage error; a missing import inside it is the
        # module's own problem and keeps its traceback.
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise CliError(
                f"{flag}: cannot import {module_name!r} (searched the current directory and sys.path)"
            ) from None
        raise


def _tokenizer(args, first_directory: Path | None):
    """The lm-eval tasks' tokenizer: --tokenizer, else the first checkpoint's (analyze), else
    --model-config's."""
    candidates = [Path(args.tokenizer)] if args.tokenizer else []
    if not candidates:
        candidates = [Path(d) for d in (first_directory, args.model_config) if d is not None]
    for directory in map(Path, candidates):
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if args.tokenizer:
        raise CliError(f"--tokenizer {args.tokenizer} holds no tokenizer files")
    where = "the first checkpoint has none" if first_directory is not None else "--model-config holds none"
    raise CliError(f"lm-eval tasks need a tokenizer: {where}; pass --tokenizer DIR")


def _text_tasks(args, checkpoints) -> list:
    """One next-token task per --text file, tokenized by every checkpoint's own tokenizer."""
    from checkpoint_stability.offline.analysis import text_task

    if args.text_name and len(args.text_name) != len(args.text):
        raise CliError(
            f"--text-name names {len(args.text_name)} task(s) for {len(args.text)} --text file(s); "
            "give one name per file, in the same order, or none"
        )
    if args.text_max_tokens < 1:
        raise CliError(f"--text-max-tokens must be at least 1, got {args.text_max_tokens}")
    if args.model_config:
        config_dir: Path | None = Path(args.model_config)
    else:
        config_dir = checkpoints[0].directory if checkpoints else None  # follow --model: no config
    context, vocab_size = _model_limits(config_dir)
    block_size = args.text_block_size
    if block_size is None:
        block_size = DEFAULT_TEXT_BLOCK_SIZE if context is None else min(DEFAULT_TEXT_BLOCK_SIZE, context)
    elif block_size < 2:
        raise CliError(f"--text-block-size must be at least 2 (one token to predict), got {block_size}")
    elif context is not None and config_dir is not None and block_size > context:
        raise CliError(
            f"--text-block-size {block_size} is longer than the model's context ({context} tokens, from "
            f"{config_dir / 'config.json'}); use at most {context}"
        )
    tokenizers = _text_tokenizers(args, checkpoints)
    names = args.text_name or [None] * len(args.text)
    tasks = []
    for path, name in zip(args.text, names, strict=True):
        task = text_task(
            path,
            tokenizers,
            name=name,
            block_size=block_size,
            max_tokens=args.text_max_tokens,
            batch_size=args.batch_size,
            vocab_size=vocab_size,
        )
        agreed = f", the same with all {len(tokenizers)} tokenizers" if len(tokenizers) > 1 else ""
        logger.info(
            "task %r: next-token accuracy on the first %d predicted tokens of %s, in sequences of %d "
            "tokens (tokenized by %s%s)",
            task.name,
            len(task.targets),
            path,
            block_size,
            tokenizers[0][0],
            agreed,
        )
        tasks.append(task)
    return tasks


def _text_tokenizers(args, checkpoints) -> list[tuple[str, object]]:
    """(where from, tokenizer) for --text: --tokenizer alone if given; else the tokenizer of every
    checkpoint directory that has one, and --model-config's for checkpoints that have none."""
    if args.tokenizer:
        if not _has_tokenizer(Path(args.tokenizer)):
            raise CliError(f"--tokenizer {args.tokenizer} holds no tokenizer files")
        return [(f"--tokenizer {args.tokenizer}", _load_tokenizer(Path(args.tokenizer)))]
    sources: list[tuple[str, Path]] = []
    without = []
    for checkpoint in checkpoints:
        folder = checkpoint.directory if checkpoint.layout != "file" else None
        if folder is not None and _has_tokenizer(folder):
            sources.append((str(folder), folder))
        else:
            without.append(checkpoint)
    if (without or not checkpoints) and args.model_config and _has_tokenizer(Path(args.model_config)):
        sources.append((f"--model-config {args.model_config}", Path(args.model_config)))
    elif without and sources:
        logger.info(
            "%d checkpoint(s) without a tokenizer (e.g. %s) are evaluated on the tokens of the others'",
            len(without),
            without[0].path,
        )
    if not sources and not checkpoints:  # follow: no checkpoint directories to look in
        raise CliError(
            "--text needs a tokenizer: pass --tokenizer DIR (or a --model-config DIR that holds one: "
            "tokenizer.json, tokenizer_config.json, ...)"
        )
    if not sources:
        raise CliError(
            "--text needs a tokenizer: no checkpoint directory holds one (tokenizer.json, "
            "tokenizer_config.json, ...) and --model-config names none; pass --tokenizer DIR"
        )
    return [(source, _load_tokenizer(folder)) for source, folder in sources]


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _model_limits(config_dir: Path | None) -> tuple[int | None, int | None]:
    """The model's context length and vocabulary size from its config.json, where it says them."""
    from checkpoint_stability.storage.json_files import read_json_object

    if config_dir is None:
        return None, None
    try:
        config = read_json_object(config_dir / "config.json")
    except FileNotFoundError:
        return None, None
    keys = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length")
    context = next((config[k] for k in keys if type(config.get(k)) is int and config[k] > 0), None)
    vocab = config.get("vocab_size")
    return context, vocab if type(vocab) is int and vocab > 0 else None


def _lm_eval_tasks(args, tokenizer) -> list:
    from checkpoint_stability.tasks.lm_eval import LmEvalTask

    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise CliError(f"--limit wants a whole number of documents or a fraction < 1, got {limit}")
        limit = int(limit)
    tasks = []
    for name in (part.strip() for part in args.lm_eval.split(",")):
        if not name:
            continue
        try:
            tasks.append(
                LmEvalTask(
                    name,
                    name,
                    tokenizer=tokenizer,
                    include_path=args.include_path or None,
                    num_fewshot=args.num_fewshot,
                    limit=limit,
                    batch_size=args.batch_size,
                )
            )
        except ImportError as error:
            raise CliError(str(error)) from None
        except ValueError as error:
            raise CliError(f"--lm-eval {name}: {error}") from None
    return tasks


if __name__ == "__main__":
    sys.exit(main())

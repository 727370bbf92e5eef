"""The ``checkpoint-stability`` command: ``report``, ``average`` and ``analyze``.

Errors a user can fix (a missing or mismatched checkpoint, a bad option, a run directory that holds
another analysis) are one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
Anything else (a bug in a task, say) keeps its traceback.
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

PROG = "checkpoint-stability"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

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
            f"  {PROG} report runs/offline\n"
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
    analyze.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="a function returning a list of tasks, e.g. my_tasks:build (a module importable from the "
        "current directory) or path/to/tasks.py:build; repeatable",
    )
    analyze.add_argument(
        "--lm-eval", metavar="NAMES", help="comma-separated lm-evaluation-harness task names (needs lm-eval)"
    )
    analyze.add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="a directory of lm-eval task YAMLs"
    )
    analyze.add_argument("--limit", type=float, help="lm-eval: first N documents (N < 1: a fraction)")
    analyze.add_argument("--num-fewshot", type=int, help="lm-eval: number of few-shot examples")
    analyze.add_argument("--batch-size", type=int, default=8, help="lm-eval: batch size (default: 8)")
    analyze.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory for lm-eval tasks (default: the first checkpoint, or --model-config)",
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
    analyze.add_argument("--no-progress", action="store_true", help="no progress bar")
    analyze.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    return parser


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
        return {"report": _report, "average": _average, "analyze": _analyze}[args.command](args)
    except user_errors as error:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; rerun the same command to resume" if args.command == "analyze" else ""
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
    if not args.tasks and not args.lm_eval:
        raise CliError("no tasks: pass --tasks MODULE:FUNCTION and/or --lm-eval NAMES")
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
    if args.lm_eval:
        tokenizer = _tokenizer(args, first)
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
    module = _import(module_name)
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


def _import(module_name: str):
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise CliError(f"--tasks: no file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise CliError(f"--tasks: {path} cannot be imported as a Python module")
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
                f"--tasks: cannot import {module_name!r} (searched the current directory and sys.path)"
            ) from None
        raise


def _tokenizer(args, first):
    candidates = [Path(args.tokenizer)] if args.tokenizer else []
    if not candidates:
        candidates = [d for d in (first.directory, args.model_config) if d is not None]
    for directory in map(Path, candidates):
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if args.tokenizer:
        raise CliError(f"--tokenizer {args.tokenizer} holds no tokenizer files")
    raise CliError("lm-eval tasks need a tokenizer: the first checkpoint has none; pass --tokenizer DIR")


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

"""``python -m trainer --config FILE.toml [--section.key=value ...]`` (also under torchrun)."""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from trainer.config import ConfigError, builtin_configs, print_help


def usage() -> str:
    """What ``python -m trainer`` with no arguments prints: how to call it and the configs
    that come with it."""
    names = builtin_configs()
    return "\n".join([
        "usage: python -m trainer --config NAME_OR_FILE.toml [--section.key=value ...]",
        "       torchrun --nproc_per_node N -m trainer --config NAME_OR_FILE.toml [...]",
        "       (installed: shardrec-train --config ...)",
        "",
        "  --help          every config key with its type, default and meaning",
        "  --list-models   the registered models",
        "",
        "built-in configs (--config NAME; files in launch/configs/):",
        *(f"  {n}" for n in names),
        "",
        "example: python -m trainer --config deepfm_synthetic --training.steps=100",
    ])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage())
        return 2
    if "-h" in argv or "--help" in argv:
        print_help()
        print_model_args_help(argv)
        return 0
    if "--list-models" in argv:
        from models import get_model_spec, list_models

        for name in list_models():
            print(f"{name}: {get_model_spec(name).description}")
        return 0
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            print("error: --config needs a file", file=sys.stderr)
            return 2
        config_path = argv[i + 1]
        del argv[i : i + 2]
    else:
        for i, a in enumerate(argv):
            if a.startswith("--config="):
                config_path = a.split("=", 1)[1]
                del argv[i]
                break
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    # Our own progress on rank 0 only; torchrec's INFO chatter (per-batch pipeline notes,
    # TBE arguments) stays at WARNING.
    for name in ("trainer", "sharding", "data", "models"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)
    from trainer.validation import load_checked_config  # imports the model registry

    try:
        cfg = load_checked_config(config_path, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.log.verbose:
        from trainer.quiet import install_quiet_filters

        install_quiet_filters()
    from trainer.trainer import train

    from trainer.preempt import Preempted

    try:
        train(cfg)
    except Preempted as e:  # a checkpoint was written: not a failure, but not finished either
        logging.getLogger("trainer").warning("rank %d: %s", rank, e)
        print(f"rank {rank} preempted: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 — any failure must become an exit code + one line
        report_failure(rank, e)
        if is_user_error(e):
            return 2  # bad input or settings (e.g. a batch larger than a rank's rows)
        return int(getattr(e, "exit_code", 1))  # NonFiniteLoss: 3 (docs/guarantees.md)
    return 0


def is_user_error(error: BaseException) -> bool:
    """Bad input — a dataset, schema or setting problem — is the user's to fix: its message
    names the file/row/column/key and the fix, and a traceback would only bury it."""
    from data.reader import DataError
    from data.schema import SchemaError

    return isinstance(error, (DataError, SchemaError, ConfigError))


def print_model_args_help(argv: List[str]) -> None:
    """The ``[model.args]`` keys of the model named by ``--model.name=NAME`` (or a hint)."""
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--model.name=")), None)
    if name is None:
        print("\n[model.args] keys of a model: python -m trainer --help --model.name=NAME")
        return
    from models import get_model_spec

    try:
        spec = get_model_spec(name)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return
    print(f"\n[model.args] of {name!r} (defaults of its 'default' flavour; flavours: "
          f"{', '.join(sorted(spec.flavours))}):")
    print("\n".join(spec.args_help()))


def report_failure(rank: int, error: BaseException) -> None:
    """Tell people and schedulers why this rank died.

    The traceback goes to the log (stderr, and rank 0's ``train.log``); torchrun's error file
    gets the exception so its failure summary names the root-cause rank; and the last line on
    stderr is ``rank R failed: <ExcType>: <message>`` on one line, for scripts and scheduler UIs
    that show only a job's tail.
    """
    user_error = is_user_error(error)  # no traceback for those; anything else keeps it
    logging.getLogger("trainer").error("training failed%s", ": bad input" if user_error else "",
                                       exc_info=None if user_error else error)
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    # Writes only when torchrun/torchelastic set TORCHELASTIC_ERROR_FILE for this worker.
    get_error_handler().record_exception(error)
    message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    print(f"rank {rank} failed: {type(error).__name__}: {message}", file=sys.stderr, flush=True)


def exit_now(code: int) -> None:
    """Flush what this process wrote and leave without the interpreter's teardown.

    A finished run has closed everything it writes (checkpoints and the metrics file are
    written and renamed synchronously; the process group is destroyed in ``train``), yet
    the C++ static destructors that run at interpreter exit occasionally abort the process
    with "terminate called without an active exception" (a still-joinable ``std::thread``
    in the distributed runtime's teardown): seen a handful of times in hundreds of runs,
    always after the ``final`` line, turning a good run into exit code -6 that torchrun,
    torchx and schedulers report as a failure. ``os._exit`` skips that teardown; the
    logging handlers (rank 0's ``train.log``) and the standard streams are flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save
            pass
    os._exit(code)


def run() -> None:
    """The ``shardrec-train`` console script: :func:`main`, then :func:`exit_now`."""
    exit_now(main())


if __name__ == "__main__":
    run()

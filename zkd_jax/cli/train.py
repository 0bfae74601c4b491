r"""``zkd-train``: the command line of the trainer (absl flags + ``ml_collections.config_flags``).

    zkd-train --workdir=workdir/demo                      # the offline demo (the default config)
    zkd-train --config=configs/cifar100.py:kd_ls,resnet32x4,resnet8x4 --workdir=DIR \
        --config.teacher.checkpoint=teachers/resnet32x4 --config.seed=1
    zkd-train --config=configs/imagenet.py:kd_ls,ResNet34,ResNet18 --workdir=gs://bucket/run \
        --config.data_dir=gs://bucket/tfds --config.mixed_precision=True

What a config runs is ``zkd_jax.trainer.train_and_evaluate``: the demo suite, or one run of the
trainer (after training a missing teacher when the config asks for it). A run started in a workdir
that holds checkpoints resumes. Errors a user can fix end with one line ``zkd-train: error: ...``
and exit code 2 (``zkd_jax.cli.errors``); ``--verbose`` or ``ZKD_TRACEBACK=1`` adds the traceback.
A run that fails (a full disk, NaN) ends with exit code 1; a preempted run (SIGTERM) saves a
checkpoint at the next step and ends with exit code 75: rerun the same command to resume
(``zkd_jax.trainer.preemption``). ``--allow_config_change`` lets a resumed run continue with a
config that differs from its checkpoints' (``zkd_jax.trainer.identity``).
"""

from __future__ import annotations

import errno
import os
import re
import sys

from absl import app, flags

import zkd_jax.configs
from zkd_jax.cli import errors, usage

usage.require("zkd-train", usage.TRAIN_MODULES)  # one line naming the extra, not an ImportError
from ml_collections import config_flags  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(zkd_jax.configs.__file__), "demo.py")

_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
    """Defines --config and --workdir (once).

    ``config_flags`` loads the default config and applies ``--config.FIELD`` overrides already when
    the flag is defined, so a bad override fails here: it ends in one line, not a traceback.
    """
    if _FLAGS:
        return
    try:
        _FLAGS["config"] = config_flags.DEFINE_config_file(
            "config", _DEFAULT_CONFIG,
            "Config file and argument, e.g. configs/cifar100.py:kd_ls,resnet32x4,resnet8x4 "
            "(default: the offline digits demo). Override fields with --config.FIELD=VALUE.",
            lock_config=True,
        )
    except (AttributeError, KeyError) as err:  # --config.FIELD=... for a field the config lacks
        _exit_unknown_field(err)
    _FLAGS["workdir"] = flags.DEFINE_string(
        "workdir", None, "Directory (local or gs://) for checkpoints, metrics and the summary "
        "(required unless --print_config).")
    _FLAGS["print_config"] = flags.DEFINE_bool(
        "print_config", False, "Print the resolved config, every field with its help, and exit.")
    _FLAGS["verbose"] = flags.DEFINE_bool(
        "verbose", False, f"Show the traceback of an error too (as {errors.TRACEBACK_ENV}=1 does).")
    _FLAGS["allow_config_change"] = flags.DEFINE_bool(
        "allow_config_change", False,
        "Resume a run with a config that differs from the one its checkpoints were trained with "
        "(the change is recorded in summary.json); without it such a resume stops.")


def _exit_unknown_field(err: BaseException) -> None:
    name = str(_root_cause(err)).strip("\"'")
    if "has no attribute 'get_config" in name:  # an empty config file, or one without it
        usage.fail("zkd-train", "the --config file defines no get_config() function; it must "
                   "define get_config() returning an ml_collections.ConfigDict.")
    usage.fail("zkd-train", usage.unknown_field_message(sys.argv[1:], _DEFAULT_CONFIG, name))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage.fail("zkd-train",
                   f"unexpected arguments: {' '.join(argv[1:])} (see zkd-train --help)")
    usage.quiet_logs()  # orbax logs every file it writes at INFO
    import zkd_jax.trainer as trainer  # noqa: PLC0415  (after flag parsing: keeps --help fast)
    from zkd_jax.trainer import faults, suite  # noqa: PLC0415

    verbose = _FLAGS["verbose"].value
    with errors.reported("zkd-train", verbose=verbose), usage.extras_reported("zkd-train"):
        try:
            config = _FLAGS["config"].value
            config.get("suite")  # config_flags loads the file lazily: fail here, not deep inside
        except OSError as err:  # config_flags defers a missing/broken --config file to here
            raise ValueError(f"cannot load the --config file: {_root_cause(err)}") from err
        except flags.Error as err:  # get_config() returned None
            raise ValueError(f"the --config file gave no config ({_root_cause(err)}); its "
                             "get_config() must return an ml_collections.ConfigDict.") from err
        if _FLAGS["print_config"].value:
            from zkd_jax.configs import fields  # noqa: PLC0415

            print(fields.describe(config))
            return
        workdir = _FLAGS["workdir"].value
        if not workdir:
            usage.fail("zkd-train", "--workdir is required (a local directory or gs://...); "
                       "see zkd-train --help")
        suite.refuse_replaced_overrides(config, _config_overrides())
        try:
            with faults.quiet_background_errors(not verbose):
                trainer.train_and_evaluate(config, workdir,
                                           allow_config_change=_FLAGS["allow_config_change"].value)
        except OSError as err:
            if not faults.is_disk_full(err) or err.filename:
                raise
            raise OSError(errno.ENOSPC, "No space left on device", workdir) from err
        except Exception as err:  # e.g. a background write's error that reached the main thread
            if isinstance(err, errors.user_errors()) or not faults.is_disk_full(err):
                raise
            raise OSError(errno.ENOSPC, "No space left on device", workdir) from err


def _config_overrides() -> list[str]:
    """The ``--config.FIELD`` names given on the command line."""
    try:
        return list(config_flags.get_override_values(flags.FLAGS[_FLAGS["config"].name]))
    except (AttributeError, TypeError):  # not a config_flags flag
        return []


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (config_flags wraps get_config's ValueError twice)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        nxt = err.__cause__ or err.__context__
        if nxt is None:
            break
        err = nxt
    return err


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a config argument that get_config rejects ends in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as err:
        errors.fail("zkd-train", f"unknown flag --{err.flagname}"
                    f"{usage.did_you_mean(err.flagname, list(flags.FLAGS))} (see zkd-train --help)")
    except SyntaxError as err:  # the --config file is not valid Python
        where = f"{err.filename}, line {err.lineno}" if err.filename else "the --config file"
        errors.fail("zkd-train", f"cannot load the --config file: {err.msg} ({where}); fix the "
                    "file.")
    except flags.Error as err:
        cause = _root_cause(err)
        message = str(cause) if isinstance(cause, (ValueError, TypeError)) else str(err)
        field = re.match(r"flag --(config\.[\w.]+)=(.*?): ", str(err))
        if field:  # a --config.FIELD=VALUE of the wrong type: name the field
            message = (f"--{field.group(1)}={field.group(2)} is not a valid value of "
                       f"{field.group(1)} ({message}).")
        errors.fail("zkd-train", message)
    except (AttributeError, KeyError) as err:  # --config.FIELD=... for a field the config lacks
        _exit_unknown_field(err)


def run() -> None:
    """The ``zkd-train`` entry point."""
    _define_flags()
    usage.print_help_if_asked(
        "zkd-train", __doc__, __name__,
        usage="zkd-train [--config=FILE[:ARG]] --workdir=DIR [--config.FIELD=VALUE ...]",
        extra=["  --config.FIELD=VALUE: override a config field (see --print_config)"])
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()

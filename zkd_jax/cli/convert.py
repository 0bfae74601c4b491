"""``zkd-convert``: a published PyTorch teacher -> a zkd_jax variables checkpoint, without torch.

    zkd-convert cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth teachers/resnet32x4 --arch resnet32x4
    zkd-convert resnet34-b627a593.pth teachers/ResNet34 --arch ResNet34 --dataset imagenet

absl flags, like ``zkd-train``. Exit status 0 on success, 2 on an error a user can fix (one line
``zkd-convert: error: ...`` on stderr; ``--verbose`` or ``ZKD_TRACEBACK=1`` adds the traceback):
a file that is not a checkpoint of the architecture, NaN or inf weights (the tensor is named), an
existing DST without ``--force``, a full disk (DST named; no temporary directory is left behind).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

from absl import flags

from zkd_jax import models
from zkd_jax.cli import errors, usage
from zkd_jax.io import staging, torch_weights

PROG = "zkd-convert"
USAGE_LINE = f"{PROG} SRC DST --arch NAME [--dataset DATASET] [--num-classes N] [--force]"


def _flag_values() -> flags.FlagValues:
    """The command's own flags (not absl's global FLAGS: zkd-train's flags live there)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("arch", None, "architecture name, e.g. resnet32x4, ResNet34, deit_ti (with "
                        "--dataset cifar100_224)", flag_values=fv)
    flags.DEFINE_enum("dataset", "cifar100", sorted(models.DATASETS), "dataset family of the model",
                      flag_values=fv)
    flags.DEFINE_integer("num-classes", None,
                         "number of classes (default: read from the classifier's weight)",
                         flag_values=fv)
    flags.DEFINE_boolean("force", False, "overwrite an existing DST", flag_values=fv)
    flags.DEFINE_boolean("verbose", False, "show the traceback of an error too", flag_values=fv)
    flags.DEFINE_boolean("help", False, "show this help", short_name="h", flag_values=fv)
    return fv


def _error(message: str, code: int = errors.EXIT_CODE) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def run(argv: Sequence[str] | None = None) -> int:
    """Runs ``zkd-convert`` on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = _flag_values()
    try:
        positional = fv([PROG, *argv])[1:]
    except flags.UnrecognizedFlagError as err:
        return _error(f"unknown flag --{err.flagname}{usage.did_you_mean(err.flagname, list(fv))}"
                      " (see --help)")
    except flags.Error as err:
        return _error(str(err))
    if fv.help:
        own = list({fv[n].name: fv[n] for n in fv}.values())
        print(usage.help_text(PROG, __doc__, own, usage=USAGE_LINE, absl_verbosity=False))
        return 0
    if len(positional) != 2:
        return _error(f"expected SRC and DST, got {len(positional)} arguments; see --help.")
    if not fv.arch:
        return _error("--arch is required (e.g. --arch resnet32x4); see --help.")
    src, dst = positional
    num_classes = fv["num-classes"].value
    try:
        sd = torch_weights.load_torch_checkpoint(src)
        staging.check_finite(sd, what=src)
        num_classes = num_classes or torch_weights.infer_num_classes(sd, fv.arch)
        variables = torch_weights.from_torch_state_dict(fv.arch, sd, dataset=fv.dataset,
                                                  num_classes=num_classes)
        torch_weights.save_variables(dst, variables, arch=fv.arch, dataset=fv.dataset,
                               num_classes=num_classes, overwrite=fv.force)
    except errors.user_errors() as err:
        if errors.show_traceback(fv.verbose):
            traceback.print_exc()
        return _error(errors.one_line(err), errors.FAILED_RUN_EXIT_CODE if errors.failed_run(err)
                      else errors.EXIT_CODE)
    n = models.count_params(variables)
    print(f"{PROG}: wrote {fv.arch} ({fv.dataset}, {num_classes} classes, {n:,} parameters) "
          f"to {dst}")
    return 0


def main() -> None:
    """The ``zkd-convert`` entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()

"""``zkd-compile``: compiles a config's programs for a TPU topology without a TPU, and says what
they cost per chip (``zkd_jax.aot``).

    zkd-compile --config=configs/cifar100.py:kd_ls,resnet32x4,resnet8x4 --topology=v5e:2x2
    zkd-compile --config=configs/imagenet.py:kd_ls,ResNet34,ResNet18 --topology=v5p:2x2x2 \
        --per_chip_batch=256 --config.mixed_precision=True --json

Same ``--config`` (and ``--config.FIELD`` overrides) as ``zkd-train``. Prints per program (train
step, scanned steps, eval step; K students: the K-student step) HBM per chip, FLOPs and bytes per
chip per step, the roofline bound and the compile time; ``--json``: one JSON object per program
(keys: ``zkd_jax.aot.figures.KEYS``, documented in docs/tpu_compile.md). Exit codes: 0 every
program compiled and fits; 1 a program does not fit the chip's HBM (one line: the bytes needed,
the chip's HBM, a batch that fits) or the compiler crashed or failed; 2 a usage or config error
(an unknown topology lists the known ones; without libtpu, the extra to install).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from zkd_jax.cli import errors, usage

PROG = "zkd-compile"
if usage.missing(usage.TRAIN_MODULES):  # one line naming the extra, not an ImportError
    usage.fail(PROG, f"this needs the 'tpu' extra ({usage.missing(usage.TRAIN_MODULES)[0]} is not "
                     "installed): pip install 'zkd_jax[tpu]' ('zkd_jax[train]' is enough for "
                     "--topology=cpu)")
from ml_collections import config_flags  # noqa: E402

from zkd_jax.cli.train import _DEFAULT_CONFIG, _root_cause  # noqa: E402

_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
    if _FLAGS:
        return
    try:
        _FLAGS["config"] = config_flags.DEFINE_config_file(
            "config", _DEFAULT_CONFIG,
            "Config file and argument, as zkd-train takes it. Override fields with "
            "--config.FIELD=VALUE.", lock_config=True)
    except (AttributeError, KeyError) as err:
        _exit_unknown_field(err)
    _FLAGS["topology"] = flags.DEFINE_string(
        "topology", None, "TPU slice to compile for, e.g. v5e:2x2, v5p:2x2x1, v5p:2x2x2, v6e:2x2; "
        "'cpu' or 'cpu:N' compiles for this machine's CPU devices.", required=True)
    _FLAGS["per_chip_batch"] = flags.DEFINE_integer(
        "per_chip_batch", None, "Images per chip per step (default: the config's batch_size is "
        "the global batch, as zkd-train runs it).")
    _FLAGS["json"] = flags.DEFINE_bool("json", False, "One JSON object per program.")
    _FLAGS["all_forms"] = flags.DEFINE_bool(
        "all_forms", False, "K students: compile every form of the K-student step.")
    _FLAGS["verbose"] = flags.DEFINE_bool("verbose", False, "Show tracebacks of errors.")


def _exit_unknown_field(err: BaseException) -> None:
    name = str(_root_cause(err)).strip("\"'")
    usage.fail(PROG, usage.unknown_field_message(sys.argv[1:], _DEFAULT_CONFIG, name))


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(report) -> str:
    """The human-readable table of a :class:`zkd_jax.aot.Report`."""
    p = report.plan
    head = (f"{p.get('topology')}: {p.get('chips')} chips ({p.get('device_kind')}, "
            f"{p.get('processes')} host(s)), jax {p.get('jax_version')}, libtpu "
            f"{p.get('libtpu_version') or '-'}; {p.get('steps_per_epoch')} steps per epoch")
    cols = ("program", "img/chip", "args GiB", "out GiB", "temp GiB", "total GiB", "% HBM",
            "GFLOP/step", "GB/step", "bound", "img/s/chip", "img/s slice", "epoch s", "compile s")
    rows = [cols]
    notes = []
    for r in report.records:
        if r["status"] != "ok":
            rows.append((r["program"], r["status"]) + ("",) * (len(cols) - 2))
            notes.append(f"{r['program']}: {r.get('error')}")
            continue
        rows.append((
            r["program"] + ("" if r.get("runs", True) else " (alt)"),
            _num(r["per_chip_batch"], "g"), _gib(r["argument_bytes"]), _gib(r["output_bytes"]),
            _gib(r["temp_bytes"]), _gib(r["total_bytes"]),
            _num(None if r["hbm_fraction"] is None else 100 * r["hbm_fraction"], ".2f"),
            _num(r["flops_per_step"] / 1e9, ".2f"), _num(r["bytes_per_step"] / 1e9, ".3f"),
            r["bound"] or "-", _num(r["images_per_sec_per_chip"], ",.0f"),
            _num(r["images_per_sec_slice"], ",.0f"), _num(r["epoch_seconds"], ".2f"),
            _num(r["compile_seconds"], ".1f")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
    lines = [head] + ["  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                                for i, (v, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines + notes)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])} (see {PROG} --help)")
    usage.quiet_logs()
    from zkd_jax import aot  # noqa: PLC0415

    with errors.reported(PROG, verbose=_FLAGS["verbose"].value):
        try:
            config = _FLAGS["config"].value
            config.get("suite")
        except OSError as err:
            raise ValueError(f"cannot load the --config file: {_root_cause(err)}") from err
        try:
            report = aot.compile_programs(config.to_dict(), _FLAGS["topology"].value,
                                          per_chip_batch=_FLAGS["per_chip_batch"].value,
                                          all_forms=_FLAGS["all_forms"].value)
        except (aot.DoesNotFitError, RuntimeError) as err:  # does not fit; the child died
            print(f"{PROG}: error: {errors.one_line(err)}", file=sys.stderr, flush=True)
            sys.exit(1)
    if _FLAGS["json"].value:
        for r in report.records:
            print(json.dumps({k: r.get(k) for k in aot.KEYS}))
    else:
        print(format_table(report))
    if report.failed:
        for r in report.failed:
            print(f"{PROG}: error: {r.get('error')}", file=sys.stderr)
        sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as err:
        errors.fail(PROG, f"unknown flag --{err.flagname}"
                    f"{usage.did_you_mean(err.flagname, list(flags.FLAGS))} (see {PROG} --help)")
    except flags.Error as err:
        cause = _root_cause(err)
        errors.fail(PROG, str(cause) if isinstance(cause, (ValueError, TypeError)) else str(err))
    except (AttributeError, KeyError) as err:
        _exit_unknown_field(err)


def run() -> None:
    """The ``zkd-compile`` entry point."""
    _define_flags()
    usage.print_help_if_asked(
        PROG, __doc__, __name__,
        usage=f"{PROG} [--config=FILE[:ARG]] --topology=TOPOLOGY [--per_chip_batch=N] [--json]",
        extra=["  --config.FIELD=VALUE: override a config field, as with zkd-train"])
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()

"""What every ``zkd-*`` command shares: its own ``--help``, exit codes, quiet logs, and one line
(exit code 2) for a usage error, a missing extra or a misspelled name, with the closest names.

Exit codes, the same on every command: 0 success, 2 a usage or config error, 1 a failed run,
75 preempted (a checkpoint was saved; rerun the same command to resume).

>>> closest("sed", ["seed", "epochs", "dataset"])
['seed']
>>> did_you_mean("optimizer.lrr", ["optimizer.lr", "optimizer.momentum"])
"; did you mean 'optimizer.lr'?"
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging as std_logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75
EXIT_CODES = ("exit codes: 0 success, 2 usage or config error, 1 failed run, 75 preempted "
              "(checkpoint saved; rerun the same command to resume)")

#: Top-level module -> the extra of ``zkd_jax`` that installs it.
EXTRAS: dict[str, str] = {
    "matplotlib": "report",
    "ml_collections": "train",
    "orbax": "train",
    "tensorboardX": "train",
    "tqdm": "train",
    "etils": "train",
    "tensorflow": "data",
    "tensorflow_datasets": "data",
    "sklearn": "data",
    "importlib_resources": "data",
    "tunix": "tunix",
}
#: What ``zkd-train`` imports besides the core (its checkpoints, metrics and configs).
TRAIN_MODULES = ("ml_collections", "orbax", "tensorboardX", "tqdm", "etils")
HELP_ARGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def fail(prog: str, message: str, code: int = EXIT_USAGE) -> None:
    """Prints ``prog: error: message`` on stderr and exits (default: 2, a usage error)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def install_hint(module: str) -> str | None:
    """``pip install 'zkd_jax[EXTRA]'`` for a missing top-level module, or None if unknown."""
    extra = EXTRAS.get(module.split(".")[0])
    return None if extra is None else f"pip install 'zkd_jax[{extra}]'"


def missing(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported (not installed)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require(prog: str, modules: Iterable[str]) -> None:
    """Exits with one line naming the extra to install when a module of ``modules`` is missing."""
    absent = missing(modules)
    if absent:
        fail(prog, _missing_message(absent[0]))


def _missing_message(module: str) -> str:
    hint = install_hint(module) or f"pip install {module.split('.')[0]}"
    extra = EXTRAS.get(module.split(".")[0])
    what = f"the '{extra}' extra" if extra else module
    return f"this needs {what} ({module} is not installed): {hint}"


@contextlib.contextmanager
def extras_reported(prog: str) -> Iterator[None]:
    """Ends the block with one line (exit 2) when it imports a module of a missing extra."""
    try:
        yield
    except ModuleNotFoundError as err:
        if not err.name or err.name.split(".")[0] not in EXTRAS:
            raise
        fail(prog, _missing_message(err.name))


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The names of ``candidates`` closest to ``name`` (difflib's ratio >= 0.7), best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.7)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` (or ``'x' or 'y'``), or ``""`` when nothing is close."""
    near = closest(name, candidates)
    if not near:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in near) + "?"


def wants_help(argv: Sequence[str]) -> bool:
    """True when the arguments ask for help."""
    return any(arg in HELP_ARGS for arg in argv)


def examples(doc: str) -> list[str]:
    """The example command lines of a command module's docstring (its first indented block)."""
    lines, started = [], False
    for line in doc.splitlines():
        if line.startswith("    ") and line.strip():
            lines.append(line.rstrip())
            started = True
        elif started:
            break
    return lines


def _flag_line(flag) -> str:
    text = " ".join((flag.help or "").split())
    default = flag.default_as_str if flag.default is not None else None
    if default not in (None, "''", '""') and flag.flag_type() != "bool":
        text += f" (default: {default})"
    elif flag.flag_type() == "bool" and flag.default:
        text += f" (default: true; --no{flag.name} turns it off)"
    return f"  --{flag.name}: {text}"


def help_text(prog: str, doc: str, flag_list: Sequence, *, usage: str, extra: Sequence[str] = (),
              absl_verbosity: bool = True) -> str:
    """The ``--help`` of a command: usage, what it does, its own flags, examples, exit codes."""
    summary = doc.strip().splitlines()[0].replace("``", "")
    lines = [f"usage: {usage}", "", summary, "", "flags:"]
    lines += [_flag_line(f) for f in sorted(flag_list, key=lambda f: f.name)]
    lines += list(extra)
    if absl_verbosity:
        lines.append("  --verbosity: log level of the libraries (default here: warnings only; "
                     "0 info, 1 debug)")
    lines += ["", "examples:", *examples(doc), "", EXIT_CODES]
    return "\n".join(lines)


def module_flags(module: str, flag_values=None) -> list:
    """The flags that ``module`` defined in absl's ``FLAGS`` (or ``flag_values``)."""
    from absl import flags  # noqa: PLC0415

    fv = flags.FLAGS if flag_values is None else flag_values
    return list(fv.get_flags_for_module(module))


def print_help_if_asked(prog: str, doc: str, module: str, *, usage: str,
                        extra: Sequence[str] = ()) -> None:
    """Prints the command's own help and exits 0 when ``sys.argv`` asks for it."""
    if wants_help(sys.argv[1:]):
        print(help_text(prog, doc, module_flags(module), usage=usage, extra=extra))
        sys.exit(EXIT_OK)


def quiet_logs() -> None:
    """Libraries log at WARNING and above unless ``--verbosity`` was given (orbax logs at INFO)."""
    from absl import flags, logging  # noqa: PLC0415

    given = "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present
    if not given:
        logging.set_verbosity(logging.WARNING)
        for name in ("absl", "orbax", "jax", "tensorflow"):
            std_logging.getLogger(name).setLevel(std_logging.WARNING)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    elif flags.FLAGS["verbosity"].value >= 0:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # TensorFlow's native INFO lines too


def absl_parser(prog: str):
    """An ``app.run`` flags parser: a bad flag ends in one line with the closest flag names."""
    from absl import flags  # noqa: PLC0415

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.UnrecognizedFlagError as err:
            hint = did_you_mean(err.flagname, list(flags.FLAGS))
            fail(prog, f"unknown flag --{err.flagname}{hint} (see {prog} --help)")
        except flags.Error as err:
            fail(prog, f"{' '.join(str(err).split())} (see {prog} --help)")
        return []

    return parse


def config_argument(argv: Sequence[str], default: str) -> str:
    """The value of ``--config`` in ``argv`` (``PATH[:ARG]``), or ``default``."""
    value = default
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def load_config(spec: str):
    """Loads ``PATH[:ARG]`` as ``config_flags`` does: the module's ``get_config(ARG)``."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_zkd_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_field_message(argv: Sequence[str], default_config: str, leaf: str) -> str:
    """The one line for a ``--config.FIELD`` that the config lacks, with the closest names."""
    from zkd_jax.configs import fields  # noqa: PLC0415

    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    try:
        known = fields.names(load_config(config_argument(argv, default_config)))
    except Exception:  # noqa: BLE001 (only for the suggestion: fall back to the common fields)
        known = list(fields.FIELDS)
    bad = next((o for o in overrides if o not in known and o.split(".")[-1] == leaf),
               next((o for o in overrides if o not in known), leaf))
    return (f"the config has no field {bad!r}{did_you_mean(bad, known)} "
            "(zkd-train --config=... --print_config lists every field)")

"""A run's identity: the config a workdir's checkpoints were trained with, checked on every resume.

Every checkpoint's metadata holds the run's resolved config (``config.to_dict()``, as JSON) and the
run's history of accepted changes, so the identity is written atomically with the checkpoint
(orbax commits both at once) and a workdir never holds a checkpoint without it. A resume compares
the config it was given with the one of the checkpoint it resumes from, field by field (dotted
names), leaving out :data:`MAY_CHANGE`:

* only fields of :data:`MAY_CHANGE` differ: the run goes on; the change is recorded in the history;
* another field differs: :class:`ConfigChangedError` (a ``ValueError``: one line, exit code 2)
  naming each differing field with its old and new value, and how to go on: a new ``--workdir``
  for a new run, or ``--allow_config_change`` to continue this run with the new values (the change
  is then recorded in the history, which ``summary.json`` shows as ``config_history``).

Checkpoints written before identities existed carry none: they resume unchecked, and their next
checkpoint stores the config.

>>> diff({"a": 1, "method": {"temperature": 4.0}, "epochs": 3},
...      {"a": 1, "method": {"temperature": 8.0}, "epochs": 4})
{'epochs': (3, 4), 'method.temperature': (4.0, 8.0)}
>>> blocking(diff({"method": {"temperature": 4.0}, "epochs": 3},
...               {"method": {"temperature": 8.0}, "epochs": 4}))
{'method.temperature': (4.0, 8.0)}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from etils import epath

#: Config fields that may change when a run resumes (dotted names; a name covers its sub-fields).
#: Everything else is the run's identity. ``epochs`` extends (or shortens) a run along the
#: schedule the new value defines; the rest say how often to log, evaluate and checkpoint, where
#: the data and the coordinator are, and what to write besides the checkpoints.
MAY_CHANGE: tuple[str, ...] = (
    "epochs", "max_steps",
    "log_every_steps", "progress_bar", "profile_steps", "profile_start_step",
    "checkpoint_every_steps", "checkpoint_every_epochs", "keep_checkpoints",
    "eval_every_epochs", "eval_batch_size", "export",
    "data_dir", "distributed",
    "paper",  # the paper's numbers, shown in summary.json
    "teacher.recipe", "teacher.train_if_missing",  # only used to train a missing teacher
    "suite", "sweep",  # the demo's list of runs, not one run's settings
)

#: Fields added to the config after identities were first stored, each with the value that does
#: what runs did before it existed: an identity stored without the field compares as if it held
#: that value, so such checkpoints resume under the new code (and refuse any other value).
ADDED_FIELDS: dict[str, Any] = {
    "optimizer.schedule": "step", "optimizer.warmup_epochs": 0, "optimizer.min_lr": 0.0,
}

#: The key of a checkpoint's metadata that holds the run's config, and of its change history.
CONFIG_KEY = "run_config"
HISTORY_KEY = "config_history"


class ConfigChangedError(ValueError):
    """A resume was given a config that differs from the run's in fields that are not allowed to
    change (the message lists them, old and new)."""


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists, ...), so both sides compare alike."""
    return json.loads(json.dumps(value, default=str))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (old, new)}`` for every dotted field whose value differs (missing: None; a field
    of :data:`ADDED_FIELDS` missing from ``old``: the value runs had before it existed).

    >>> diff({"optimizer": {"lr": 0.1}}, {"optimizer": {"lr": 0.1, "schedule": "step"}})
    {}
    >>> diff({"optimizer": {"lr": 0.1}}, {"optimizer": {"lr": 0.1, "schedule": "cosine"}})
    {'optimizer.schedule': ('step', 'cosine')}
    """
    a, b = _flat(_plain(dict(old))), _flat(_plain(dict(new)))
    a = {**{k: v for k, v in ADDED_FIELDS.items() if k in b}, **a}
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def may_change(field: str) -> bool:
    """Whether ``field`` (dotted) is one of :data:`MAY_CHANGE` or below one."""
    return any(field == name or field.startswith(name + ".") for name in MAY_CHANGE)


def blocking(changes: Mapping[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The changes of fields that are not allowed to change on resume."""
    return {k: v for k, v in changes.items() if not may_change(k)}


def stored_meta(checkpoint_dir: epath.PathLike, step: int) -> dict:
    """The JSON metadata of checkpoint ``step`` (``<dir>/<step>/meta/metadata``); ``{}`` when
    unreadable (the checkpoint's manifest has been verified before: that is a legacy layout)."""
    path = epath.Path(checkpoint_dir) / str(step) / "meta" / "metadata"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resume_identity(meta: Mapping[str, Any], config: Mapping[str, Any], *, step: int,
                    workdir: str, allow_change: bool) -> dict[str, Any]:
    """Checks ``config`` (a ``to_dict()``) against the identity in a checkpoint's ``meta``.

    Returns the identity fields the run's next checkpoints store: ``{CONFIG_KEY: config,
    HISTORY_KEY: [...]}`` with one more history entry when something changed
    (``{"step", "changes": {field: [old, new]}, "accepted": "resumable" | "--allow_config_change"}``).

    Raises:
      ConfigChangedError: a field outside :data:`MAY_CHANGE` differs and ``allow_change`` is off.
    """
    config = _plain(dict(config))
    history = list(meta.get(HISTORY_KEY) or [])
    stored = meta.get(CONFIG_KEY)
    if stored is None:  # a checkpoint from before identities: nothing to compare with
        return {CONFIG_KEY: config, HISTORY_KEY: history}
    changes = diff(stored, config)
    refused = blocking(changes)
    if refused and not allow_change:
        listed = ", ".join(f"{k} {_describe(old)} -> {_describe(new)}"
                           for k, (old, new) in refused.items())
        raise ConfigChangedError(
            f"workdir {workdir} holds a run (checkpoint {step}) trained with another config: "
            f"{listed}; to start a new run choose another --workdir, or pass "
            "--allow_config_change to continue this run with the new values (recorded in its "
            "summary.json).")
    if changes:
        history.append({"step": step, "changes": {k: list(v) for k, v in changes.items()},
                        "accepted": "--allow_config_change" if refused else "resumable"})
    return {CONFIG_KEY: config, HISTORY_KEY: history}


def fresh_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The identity fields of a run that starts from scratch."""
    return {CONFIG_KEY: _plain(dict(config)), HISTORY_KEY: []}


def run_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """What names a run in its ``summary.json`` and ``metrics.jsonl`` (``run``), from a
    ``config.to_dict()``: dataset, method (``kd``, ``kd_ls``, ..., ``teacher``), teacher and
    student architectures and the seed.

    >>> run_identity({"dataset": "digits", "method": {"name": "kd", "standardize": True},
    ...               "teacher": {"arch": "resnet8"}, "student": {"arch": "resnet8"}, "seed": 1})
    {'dataset': 'digits', 'method': 'kd_ls', 'teacher': 'resnet8', 'student': 'resnet8', 'seed': 1}
    """
    method = dict(config.get("method") or {})
    name = str(method.get("name"))
    label = "teacher" if name == "ce" else (f"{name}_ls" if method.get("standardize") else name)
    return {"dataset": config.get("dataset"), "method": label,
            "teacher": None if name == "ce" else (config.get("teacher") or {}).get("arch"),
            "student": (config.get("student") or {}).get("arch"), "seed": config.get("seed")}


__all__ = ["CONFIG_KEY", "ConfigChangedError", "HISTORY_KEY", "MAY_CHANGE", "blocking", "diff",
           "fresh_identity", "may_change", "resume_identity", "run_identity", "stored_meta"]

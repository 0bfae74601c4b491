"""Logits and pooled features of exported models on a split (zkd-analyze's inputs; JAX).

``load_model(run_dir)`` reads ``run_dir/export`` (``zkd_jax.torch_weights.load_variables``) and builds
its module (``zkd_jax.models.create``); ``load_split(dataset, split)`` gives the normalized images
(``zkd_jax.data.load_device_arrays`` + ``zkd_jax.data.normalization``: the digits need
scikit-learn, CIFAR-100 TFDS); ``forward`` returns the logits ``[N, C]`` and the pooled features
``[N, D]`` (the input of the model's last ``Linear``, captured with ``nn.intercept_methods``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np


@dataclasses.dataclass
class Model:
    """An exported model: its name in the figures, module, variables and dataset."""

    name: str
    path: str
    module: Any
    variables: dict
    arch: str
    dataset: str | None


def model_dirs(path: str) -> list[str]:
    """``path`` itself when it holds ``export/``, else its ``student_<k>/`` that do."""
    if os.path.isdir(os.path.join(path, "export")):
        return [path]
    subs = sorted((d for d in os.listdir(path) if d.startswith("student_")
                   and os.path.isdir(os.path.join(path, d, "export"))),
                  key=lambda d: int(d.split("_")[1]) if d.split("_")[1].isdigit() else 0) \
        if os.path.isdir(path) else []
    if not subs:
        raise ValueError(f"{path!r} holds no export/ (nor student_<k>/export/); pass the workdir "
                         "of a finished zkd-train run.")
    return [os.path.join(path, d) for d in subs]


def _run_dataset(path: str) -> str | None:
    for candidate in (path, os.path.dirname(path)):
        summary = os.path.join(candidate, "summary.json")
        if os.path.isfile(summary):
            with open(summary, encoding="utf-8") as f:
                return (json.load(f).get("config") or {}).get("dataset")
    return None


def load_model(path: str, name: str | None = None) -> Model:
    """The exported model of run directory ``path`` (``path/export``)."""
    from zkd_jax import models  # pylint: disable=import-outside-toplevel
    from zkd_jax.io import torch_weights  # pylint: disable=import-outside-toplevel

    variables, meta = torch_weights.load_variables(os.path.join(path, "export"))
    module = models.create(meta["arch"], num_classes=int(meta["num_classes"]),
                           dataset=meta.get("dataset") or "cifar100")
    return Model(name=name or os.path.basename(os.path.normpath(path)), path=path, module=module,
                 variables=variables, arch=meta["arch"], dataset=_run_dataset(path))


def load_split(dataset: str, split: str = "test", limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 normalized images [N, H, W, 3], int labels [N]) of ``dataset``'s ``split``."""
    from zkd_jax import data  # pylint: disable=import-outside-toplevel
    from zkd_jax.data import normalization  # pylint: disable=import-outside-toplevel

    info = data.info(dataset)
    images, labels = data.load_device_arrays(dataset, split)
    if limit > 0:
        images, labels = images[:limit], labels[:limit]
    lut = normalization.table(info.mean, info.std)  # [256, 3]
    return lut[images, np.arange(3)], np.asarray(labels)


def forward(model: Model, images: np.ndarray, batch_size: int = 256
            ) -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 [N, C], pooled features float32 [N, D]) in eval mode."""
    import jax  # pylint: disable=import-outside-toplevel
    from flax import linen as nn  # pylint: disable=import-outside-toplevel

    from zkd_jax.models.layers import Linear  # pylint: disable=import-outside-toplevel

    def apply(variables, x):
        captured = []

        def grab(next_fn, args, kwargs, context):
            if isinstance(context.module, Linear) and context.method_name == "__call__":
                captured.append(args[0])
            return next_fn(*args, **kwargs)

        with nn.intercept_methods(grab):
            logits = model.module.apply(variables, x, train=False)
        return logits, captured[-1].reshape(x.shape[0], -1)

    fn = jax.jit(apply)
    outs = [jax.device_get(fn(model.variables, images[i:i + batch_size]))
            for i in range(0, images.shape[0], batch_size)]
    logits = np.concatenate([o[0] for o in outs]).astype(np.float32)
    features = np.concatenate([o[1] for o in outs]).astype(np.float32)
    return logits, features

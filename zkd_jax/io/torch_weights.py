"""PyTorch teachers -> Flax variables, and the orbax format teachers are stored in.

- :func:`load_torch_checkpoint` reads a ``.pth``/``.pt`` file (zip or legacy format) into
  ``{key: np.ndarray}`` without importing torch, through a restricted unpickler
  (:mod:`zkd_jax.io.torch_pickle`); it unwraps mdistiller's ``{"model": state_dict, ...}`` and
  pycls's ``{"model_state": state_dict, ...}`` (the ViT reference ``tiny-transformers``).
- :func:`from_torch_state_dict` maps a state dict of the reference's architecture onto the variables
  of :func:`zkd_jax.models.create` (``{"params": ..., "batch_stats": ...}``).
- :func:`save_variables` / :func:`load_variables` write and read an orbax checkpoint plus metadata
  (arch, dataset, num_classes); the trainer loads every teacher through :func:`load_variables`.
- ``zkd-convert`` (``zkd_jax.cli.convert``) is the command line over these functions.

Naming rule (one-to-one): a PyTorch module path has its numeric components (``Sequential`` indices)
joined to the preceding name with ``_`` (``layer1.0.downsample.1`` -> ``layer1_0/downsample_1``).
Leaves: conv ``weight (out, in/g, kh, kw)`` -> ``kernel (kh, kw, in/g, out)``; linear ``weight
(out, in)`` -> ``kernel (in, out)``; BN ``weight`` -> ``scale``; ``bias`` -> ``bias``;
``running_mean`` / ``running_var`` -> ``batch_stats`` ``mean`` / ``var``; ``num_batches_tracked``
is dropped. LayerNorm ``weight`` -> ``scale`` as BN's. Other leaves keep their name and PyTorch
shape (ViT tokens and position tables: ``cls_token``, ``pos_embed``, T2T's fixed Performer ``w``);
a module's ``buffers`` collection (fixed tensors of the state_dict, not trained) maps like
``params``. pycls's CIFAR ResNet keys (``stem.conv``, ``s1.b1.f.a_bn``, ``head.fc``: the ViT
students' ResNet-56 teacher) are renamed to the reference's (``conv1``, ``layer1.0.bn1``, ``fc``)
first (:func:`rename_pycls_resnet`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from zkd_jax import models
from zkd_jax.io import manifest, paths, staging
from zkd_jax.io.torch_pickle import UnsafeCheckpointError, load_torch_file

__all__ = [
    "UnsafeCheckpointError",
    "from_torch_state_dict",
    "load_torch_checkpoint",
    "infer_num_classes",
    "load_variables",
    "save_variables",
    "torch_layout",
]

FORMAT_VERSION = 1

_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
#: Collections mapped leaf by leaf besides BatchNorm's statistics (``buffers``: fixed tensors).
_PARAM_COLLECTIONS = ("params", "buffers")
_STATS_LEAVES = {"mean": "running_mean", "var": "running_var"}


# --------------------------------------------------------------------------------------------------
# Reading .pth files
# --------------------------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
    )


def load_torch_checkpoint(path: str | epath.PathLike) -> dict[str, np.ndarray]:
    """Read a ``torch.save`` file's state dict as ``{key: np.ndarray}`` (never imports torch).

    Accepts a plain state dict or a dict wrapping one under ``"model"`` (mdistiller, CRD),
    ``"state_dict"`` or ``"model_state"`` (pycls); other entries (epoch, optimizer state ...) are
    ignored. ``path`` may be local or any ``etils.epath`` path (``gs://...``). Raises ``UnsafeCheckpointError`` (a ``ValueError``)
    if the pickle references anything but tensors and plain containers, ``ValueError`` otherwise.
    """
    raw = epath.Path(path).read_bytes()
    obj = load_torch_file(raw)
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict", "model_state"):
            if wrapper in obj and _is_state_dict(obj[wrapper]):
                obj = obj[wrapper]
                break
    if not _is_state_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"{path} holds no state dict (found {keys}); expected a dict of tensors, possibly "
            "under 'model', 'state_dict' or 'model_state'."
        )
    return dict(obj)


# --------------------------------------------------------------------------------------------------
# state_dict <-> variables
# --------------------------------------------------------------------------------------------------


def _torch_module_path(flax_path: Sequence[str]) -> str:
    """``("layer1_0", "downsample_1") -> "layer1.0.downsample.1"``."""
    return ".".join(re.sub(r"_(\d+)(?=_|$)", r".\1", comp) for comp in flax_path)


def _torch_shape(flax_leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if flax_leaf == "kernel" and len(shape) == 4:
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if flax_leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _torch_key(path: Sequence[str], torch_leaf: str) -> str:
    return f"{_torch_module_path(path)}.{torch_leaf}" if path else torch_leaf


def _subtree(tree: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any] | None:
    for comp in path:
        if not isinstance(tree, Mapping) or comp not in tree:
            return None
        tree = tree[comp]
    return tree if isinstance(tree, Mapping) else None


def _layout_from_variables(
    variables: Mapping[str, Any],
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``torch_key -> ((collection, *flax_path, leaf), torch_shape)`` in the model's order."""
    stats = variables.get("batch_stats", {})
    layout: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}

    def walk(collection: str, node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        leaves = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        for leaf, value in leaves.items():
            key = _torch_key(path, _LEAVES.get(leaf, leaf))
            layout[key] = ((collection, *path, leaf), _torch_shape(leaf, tuple(value.shape)))
        node_stats = _subtree(stats, path) if collection == "params" and "scale" in leaves else None
        if node_stats is not None:  # a BatchNorm
            for leaf, torch_leaf in _STATS_LEAVES.items():
                key = _torch_key(path, torch_leaf)
                layout[key] = (("batch_stats", *path, leaf), tuple(node_stats[leaf].shape))
        for name, child in node.items():
            if isinstance(child, Mapping):
                walk(collection, child, (*path, name))

    for collection in _PARAM_COLLECTIONS:
        if collection in variables:
            walk(collection, variables[collection], ())
    return layout


def torch_layout(
    name: str, *, dataset: str = "cifar100", num_classes: int | None = None
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """The PyTorch ``state_dict`` layout of architecture ``name`` (without ``num_batches_tracked``).

    Returns ``{torch_key: ((collection, *flax_path, leaf), torch_shape)}``, e.g.
    ``"bn1.running_var" -> (("batch_stats", "bn1", "var"), (16,))``.
    """
    if num_classes is None:
        num_classes = models.default_num_classes(dataset)
    model = models.create(name, num_classes=num_classes, dataset=dataset)
    hw = models.image_shape(dataset)[:2]
    return _layout_from_variables(models.abstract_variables(model, image_hw=hw))


_PYCLS_BLOCK = re.compile(r"^s(\d+)\.b(\d+)\.(.*)$")
_PYCLS_IN_BLOCK = (
    ("f.a_bn.", "bn1."), ("f.b_bn.", "bn2."), ("f.a.", "conv1."), ("f.b.", "conv2."),
    ("proj.", "downsample.0."), ("bn.", "downsample.1."),
)


def rename_pycls_resnet(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """pycls's CIFAR ResNet keys -> the reference's (mdistiller's) keys; other keys unchanged.

    ``stem.conv -> conv1``, ``stem.bn -> bn1``, ``sK.bJ -> layerK.(J-1)`` with ``f.a -> conv1``,
    ``f.a_bn -> bn1``, ``f.b -> conv2``, ``f.b_bn -> bn2``, ``proj -> downsample.0``,
    ``bn -> downsample.1``; ``head.fc -> fc`` (the same network).
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key
        if key.startswith("stem.conv."):
            new = "conv1." + key[len("stem.conv."):]
        elif key.startswith("stem.bn."):
            new = "bn1." + key[len("stem.bn."):]
        elif key.startswith("head.fc."):
            new = "fc." + key[len("head.fc."):]
        elif m := _PYCLS_BLOCK.match(key):
            rest = m.group(3)
            for old, repl in _PYCLS_IN_BLOCK:
                if rest.startswith(old):
                    rest = repl + rest[len(old):]
                    break
            new = f"layer{m.group(1)}.{int(m.group(2)) - 1}.{rest}"
        out[new] = value
    return out


def _clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    sd = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    if sd and all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if "stem.conv.weight" in sd and "head.fc.weight" in sd:  # pycls's ResNet
        sd = rename_pycls_resnet(sd)
    return sd


_CLASSIFIER_KEYS = ("fc.weight", "head.weight", "classifier.weight")


def _infer_num_classes(sd: Mapping[str, np.ndarray], name: str) -> int:
    for key in _CLASSIFIER_KEYS:
        if key in sd and sd[key].ndim == 2:
            return int(sd[key].shape[0])
    linear = [k for k, v in sd.items() if v.ndim == 2]
    if len(linear) != 1:
        raise ValueError(
            f"cannot tell the number of classes of this {name} state_dict (2-D weights: {linear}); "
            "pass num_classes explicitly."
        )
    return int(sd[linear[0]].shape[0])


def infer_num_classes(state_dict: Mapping[str, Any], name: str) -> int:
    """The number of classes of a ``name`` state dict: the output size of its one 2-D weight.

    Raises:
      ValueError: the state dict has no single 2-D weight to read it from.
    """
    return _infer_num_classes(_clean_state_dict(state_dict), name)


def from_torch_state_dict(
    name: str,
    state_dict: Mapping[str, Any],
    *,
    dataset: str = "cifar100",
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Map the reference's PyTorch ``state_dict`` of ``name`` onto Flax variables.

    ``state_dict`` maps PyTorch keys to arrays (NumPy or anything ``np.asarray`` takes);
    ``num_batches_tracked`` entries and a ``module.`` prefix (``nn.DataParallel``) are ignored.
    ``num_classes`` defaults to the classifier's output size found in the state dict. Returns
    ``{"params": ..., "batch_stats": ...}`` of float32 NumPy arrays, ready for
    ``models.create(name, num_classes=..., dataset=dataset).apply``. A missing key, an extra key or
    a wrong shape raises one ``ValueError`` naming the PyTorch key and both shapes.
    """
    sd = _clean_state_dict(state_dict)
    if num_classes is None:
        num_classes = _infer_num_classes(sd, name)
    layout = torch_layout(name, dataset=dataset, num_classes=num_classes)
    expected = {k: jax.ShapeDtypeStruct(shape, np.float32) for k, (_, shape) in layout.items()}
    models.check_variables(
        expected,
        sd,
        what=f"the PyTorch state_dict given for {name} ({dataset}, {num_classes} classes)",
        hint="check --arch and --dataset: the keys and shapes must be those of the reference's "
        f"{name}",
    )
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    variables.update({path[0]: {} for path, _ in layout.values() if path[0] not in variables})
    for key, (path, _) in layout.items():
        value = sd[key].astype(np.float32)
        leaf = path[-1]
        if leaf == "kernel" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif leaf == "kernel" and value.ndim == 2:
            value = value.T
        node = variables
        for comp in path[:-1]:
            node = node.setdefault(comp, {})
        node[leaf] = np.ascontiguousarray(value)
    return variables


# --------------------------------------------------------------------------------------------------
# orbax storage
# --------------------------------------------------------------------------------------------------


def _checkpointer():
    import orbax.checkpoint as ocp  # noqa: PLC0415  (heavy; only where checkpoints are written/read)

    handler = ocp.CompositeCheckpointHandler(
        variables=ocp.PyTreeCheckpointHandler(), metadata=ocp.JsonCheckpointHandler()
    )
    return ocp, ocp.Checkpointer(handler)


def save_variables(
    directory: str | epath.PathLike,
    variables: Mapping[str, Any],
    *,
    arch: str,
    dataset: str,
    num_classes: int,
    overwrite: bool = False,
) -> None:
    """Write ``variables`` (``{"params", "batch_stats"}``) and metadata as one orbax checkpoint.

    The directory holds two items, ``variables`` (a PyTree checkpoint) and ``metadata`` (JSON:
    arch, dataset, num_classes, format) and the manifest ``zkd_manifest.json``. Locally it is
    written into a temporary sibling that is renamed onto ``directory`` once complete
    (``zkd_jax.io.staging``): ``directory`` is the old content or the whole new one, never a part;
    a failed write removes its temporaries and raises one ``OSError`` naming ``directory`` (disk
    full: ``ENOSPC``). ``gs://`` directories are written in place (orbax's commit marker). An
    existing directory raises ``ValueError`` unless ``overwrite``. In a multi-process job every
    process must call this (orbax coordinates the write).
    """
    models.create(arch, num_classes=num_classes, dataset=dataset)  # validates the three together
    path = paths.absolute(directory)
    if path.exists() and not overwrite:
        raise ValueError(
            f"{path} already exists; choose a new directory or pass overwrite=True (--force)."
        )
    ocp, ckptr = _checkpointer()
    meta = {
        "arch": arch,
        "dataset": dataset,
        "num_classes": int(num_classes),
        "format": FORMAT_VERSION,
    }
    tree = {k: dict(v) for k, v in variables.items()}
    args = ocp.args.Composite(variables=ocp.args.PyTreeSave(tree), metadata=ocp.args.JsonSave(meta))
    primary = jax.process_index() == 0
    with staging.staged(path, overwrite=overwrite, primary=primary) as target:
        ckptr.save(target, args=args, force=True)
        if primary:
            manifest.write(target)  # checksums of the committed files (zkd_jax.io.manifest)


def load_variables(
    directory: str | epath.PathLike, *, allow_unverified: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_variables`: ``(variables, metadata)``.

    ``variables`` holds NumPy arrays (host memory, independent of the device topology: place or
    shard them yourself); ``metadata`` has ``arch``, ``dataset``, ``num_classes``. To check them
    against a model:
    ``models.check_variables(models.abstract_variables(model), variables, what=...)``.

    The directory is verified against its manifest first (``zkd_jax.io.manifest``;
    ``save_variables`` writes one): a missing, truncated or altered file raises one ``ValueError``,
    as any other failure to read it does. A directory without a manifest is refused unless
    ``allow_unverified`` (variables written by other tools; ``config.teacher.allow_unverified``).
    """
    path = paths.absolute(directory)
    if not (path / "metadata").exists() or not (path / "variables").exists():
        raise ValueError(
            f"{path} is not a zkd_jax variables checkpoint (no 'metadata' and 'variables' items); "
            "write one with zkd-convert or save_variables."
        )
    if not manifest.has_manifest(path):
        if not allow_unverified:
            raise ValueError(
                f"{path} has no {manifest.MANIFEST}, so it cannot be verified; write it again with "
                "zkd-convert (or rerun the run that exported it), or, for variables written "
                "elsewhere, pass --config.teacher.allow_unverified=True."
            )
        damage = None
    else:
        damage = manifest.verify(path)
    if damage is not None:
        raise ValueError(f"{path} is damaged ({damage}); convert or export it again.")
    try:
        return _restore_variables(path)
    except Exception as err:  # pylint: disable=broad-except  (tensorstore / orbax on bad files)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} cannot be read ({first}); convert or export it again.") from err


def _restore_variables(path: epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    ocp, ckptr = _checkpointer()
    tree = ckptr.metadata(path).item_metadata["variables"].tree
    # Every leaf onto one local device, whatever sharding it was saved with (a teacher trained on 8
    # devices loads on 1); then to host memory.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree.map(
        lambda m: ocp.ArrayRestoreArgs(sharding=device, global_shape=m.shape, dtype=m.dtype), tree
    )
    restored = ckptr.restore(
        path,
        args=ocp.args.Composite(
            variables=ocp.args.PyTreeRestore(restore_args=restore_args),
            metadata=ocp.args.JsonRestore(),
        ),
    )
    variables = jax.tree.map(np.asarray, dict(restored["variables"]))
    return variables, dict(restored["metadata"])

"""The ViT students and their ResNet-56 teacher against the reference (``fixtures/*_vit*``).

Weights come from the golden data's NumPy generator (reimplemented below) laid out as the reference's
``state_dict`` (``architectures_vit.json``; the teacher under pycls's key names) and converted with
``from_torch_state_dict``. One jitted function per student computes its eval and train-mode
(drop path off) outputs, so each compiles once.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax import models
from zkd_jax.io import torch_weights as convert
from zkd_jax.models.vit_layers import DropPath

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ARCHS = json.loads((FIXTURES / "architectures_vit.json").read_text())
GOLDEN = np.load(FIXTURES / "models_vit_golden.npz")
STUDENTS = ["deit_ti", "t2t_vit_7", "pit_ti", "pvt_ti"]
DATASET = "cifar100_224"


def reference_state_dict(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The golden data's generator: entry ``i`` of the layout draws from ``default_rng([seed, i])``;
    the teacher's running statistics and T2T's fixed tensors come from the npz."""
    sd = {}
    for i, (key, shape) in enumerate(ARCHS[name]["state_dict"]):
        if key.endswith("num_batches_tracked"):
            continue
        if name == "resnet56" and key.endswith(("running_mean", "running_var")):
            sd[key] = GOLDEN[f"teacher/state/{key}"]
            continue
        if name == "t2t_vit_7" and (key == "pos_embed" or key.endswith("attn.w")):
            sd[key] = GOLDEN[f"t2t_vit_7/state/{key}"]
            continue
        rng = np.random.default_rng([seed, i])
        if key.endswith("bias"):
            value = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif name == "resnet56":
            value = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
        else:
            value = 0.02 * rng.standard_normal(shape)
        sd[key] = value.astype(np.float32)
    return sd


def assert_close(got, want, what: str) -> None:
    want = np.asarray(want)
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    scale = float(np.max(np.abs(want)))
    assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} > 1e-4 x {scale:.3g}"


def random_variables(model, image_hw, seed: int = 0) -> dict:
    """Variables of ``model``'s shapes, ``0.2 N(0, 1)`` (ones + noise for LayerNorm scales),
    from NumPy: no init program to compile."""
    rng = np.random.default_rng(seed)
    abstract = models.abstract_variables(model, image_hw=image_hw)

    def draw(path, leaf):
        value = 0.2 * rng.standard_normal(leaf.shape)
        if path[-1].key == "scale":
            value += 1.0
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.cache
def student_outputs(name: str) -> dict[str, np.ndarray]:
    model = models.create(name, num_classes=100, dataset=DATASET)
    variables = convert.from_torch_state_dict(name, reference_state_dict(name), dataset=DATASET)
    no_dp = model.clone(drop_path_rate=0.0)

    @jax.jit
    def run(variables, x):
        ev = model.apply(variables, x, train=False, return_heads=True)
        tr = no_dp.apply(variables, x, train=True, return_heads=True)
        out = {f"eval/head_{k}": v for k, v in ev.items()}
        out.update({f"train_nodroppath/head_{k}": v for k, v in tr.items()})
        return out

    x = GOLDEN["input_nchw"].transpose(0, 2, 3, 1)
    out = jax.tree.map(np.asarray, run(variables, x))
    # What the plain call returns (test_plain_call_returns checks it): DeiT the class head in
    # train mode and the mean of both heads in eval mode; the others their class head.
    two = "eval/head_dist" in out
    out["eval/output"] = (out["eval/head_cls"] + out["eval/head_dist"]) / 2 if two \
        else out["eval/head_cls"]
    out["train_nodroppath/output"] = out["train_nodroppath/head_cls"]
    return out


@pytest.mark.parametrize("name", [*STUDENTS, "resnet56"])
def test_trainable_parameter_counts(name):
    dataset = "cifar100" if name == "resnet56" else DATASET
    model = models.create(name, num_classes=100, dataset=dataset)
    abstract = models.abstract_variables(model, image_hw=models.image_shape(dataset)[:2])
    assert models.count_params(abstract) == ARCHS[name]["trainable_params"]


@pytest.mark.parametrize("name", STUDENTS)
def test_layout_is_the_reference_state_dict(name):
    layout = convert.torch_layout(name, dataset=DATASET)
    want = {k: tuple(s) for k, s in ARCHS[name]["state_dict"]}
    assert {k: shape for k, (_, shape) in layout.items()} == want
    fixed = sorted(k for k, (path, _) in layout.items() if path[0] == "buffers")
    assert fixed == sorted(ARCHS[name]["non_trainable_state"])


@pytest.mark.parametrize("name", STUDENTS)
def test_students_match_reference(name):
    out = student_outputs(name)
    keys = ["eval/output", "eval/head_cls", "train_nodroppath/output", "train_nodroppath/head_cls"]
    if ARCHS[name]["has_distill_token"]:
        keys += ["eval/head_dist", "train_nodroppath/head_dist"]
    for key in keys:
        assert_close(out[key], GOLDEN[f"{name}/{key}"], f"{name} {key}")


def test_teacher_matches_reference_from_pycls_keys():
    """pycls's ResNet-56 (``stem``, ``s1.b1.f.a``, ``head.fc``) is the CIFAR ``resnet56``."""
    sd = reference_state_dict("resnet56")
    assert "stem.conv.weight" in sd and "head.fc.weight" in sd
    variables = convert.from_torch_state_dict("resnet56", sd, dataset="cifar100")
    model = models.create("resnet56", num_classes=100, dataset="cifar100")
    x = GOLDEN["teacher/input_nchw"].transpose(0, 2, 3, 1)

    @jax.jit
    def run(variables, x):
        ev = model.apply(variables, x, train=False)
        tr, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return ev, tr

    ev, tr = run(variables, x)
    assert_close(ev, GOLDEN["teacher/eval/logits"], "teacher eval")
    assert_close(tr, GOLDEN["teacher/train/logits"], "teacher train (batch statistics)")
    assert_close(tr, GOLDEN["deit_ti/train_nodroppath/teacher_logits"], "teacher logits for KD")


@pytest.mark.parametrize("name", STUDENTS)
def test_drop_path_schedule(name):
    model = models.create(name, num_classes=100, dataset=DATASET)
    want = [rate for _, rate in ARCHS[name]["drop_path"]]
    np.testing.assert_allclose(model.drop_path_schedule(), want, rtol=1e-6, atol=1e-9)


def test_drop_path_per_sample_statistics():
    x = jnp.ones((20000, 3, 2))
    y = np.asarray(DropPath(0.25).apply({}, x, True, rngs={"dropout": jax.random.key(1)}))
    per_sample = y.reshape(len(y), -1)
    assert np.all(per_sample == per_sample[:, :1])  # one draw per sample
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.75], rtol=1e-6)
    dropped = float(np.mean(per_sample[:, 0] == 0))
    assert abs(dropped - 0.25) < 4 * np.sqrt(0.25 * 0.75 / len(y))
    np.testing.assert_array_equal(DropPath(0.25).apply({}, x, False), x)


def test_deit_plain_call_returns():
    """A small-width DeiT: the plain call gives the class head in train mode and the mean of both
    heads in eval mode (the single-head students return their class head either way); a
    bfloat16 forward is finite float32."""
    model = models.create("deit_ti", num_classes=5, dataset=DATASET).clone(
        img_size=32, patch_size=8, dim=16, depth=2, num_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = random_variables(model, (32, 32))
    rngs = {"dropout": jax.random.key(2)}

    @jax.jit
    def run(variables, x):
        heads_eval = model.apply(variables, x, train=False, return_heads=True)
        heads_train = model.apply(variables, x, train=True, return_heads=True, rngs=rngs)
        plain_eval = model.apply(variables, x, train=False)
        plain_train = model.apply(variables, x, train=True, rngs=rngs)
        bf16 = model.clone(dtype=jnp.bfloat16).apply(variables, x, train=False)
        return heads_eval, heads_train, plain_eval, plain_train, bf16

    heads_eval, heads_train, plain_eval, plain_train, bf16 = run(variables, x)
    assert set(heads_eval) == {"cls", "dist"}
    np.testing.assert_allclose(plain_eval, (heads_eval["cls"] + heads_eval["dist"]) / 2,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(plain_train, heads_train["cls"], rtol=1e-6, atol=1e-6)
    assert plain_eval.shape == (2, 5) and plain_eval.dtype == jnp.float32
    assert bf16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(bf16)))
    np.testing.assert_allclose(bf16, plain_eval, atol=0.1 * float(jnp.max(jnp.abs(plain_eval))))


def test_wrong_image_size_is_a_clear_error():
    model = models.create("deit_ti", num_classes=100, dataset=DATASET)
    with pytest.raises(ValueError, match="224 px"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)

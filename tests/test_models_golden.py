"""Every architecture against the reference PyTorch outputs (``fixtures/models_golden.npz``).

Weights come from the golden data's NumPy generator (reimplemented below), laid out as the reference's
``state_dict`` (``fixtures/architectures.json``) and converted with ``from_torch_state_dict``. One
jitted function per architecture computes everything the tests here check (float32 eval and train
mode, and a bfloat16 forward), so each architecture compiles once; the tests read its cached result.
"""

from __future__ import annotations

import functools
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax import models
from zkd_jax.io import torch_weights as convert

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ARCHS = json.loads((FIXTURES / "architectures.json").read_text())
GOLDEN = np.load(FIXTURES / "models_golden.npz")
CIFAR = [k for k in ARCHS if k.startswith("cifar/")]


def reference_state_dict(key: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The golden data's generator: entry ``i`` of the layout (buffers counted) draws from
    ``default_rng([seed, i])``; running statistics come from the npz."""
    family, arch = key.split("/")
    sd = {}
    for i, (name, shape) in enumerate(ARCHS[key]["state_dict"]):
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith(("running_mean", "running_var")):
            sd[name] = GOLDEN[f"{family}/{arch}/buffers/{name}"]
            continue
        rng = np.random.default_rng([seed, i])
        if name.endswith("bias"):
            value = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
        sd[name] = value.astype(np.float32)
    return sd


def golden_input(family: str) -> np.ndarray:
    x = GOLDEN[f"{family}/input_nchw"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    return x if family == "cifar" else x[:2]


@functools.cache
def outputs(key: str) -> dict[str, np.ndarray]:
    """Everything the tests need for one architecture, from a single jit compile."""
    family, arch = key.split("/")
    dataset = "cifar100" if family == "cifar" else "imagenet"
    num_classes = 100 if family == "cifar" else 1000
    variables = convert.from_torch_state_dict(arch, reference_state_dict(key), dataset=dataset)
    f32 = models.create(arch, num_classes=num_classes, dataset=dataset)
    bf16 = models.create(arch, num_classes=num_classes, dataset=dataset, dtype=jnp.bfloat16)

    def run(v, x):
        out = {"eval": f32.apply(v, x, train=False)}
        if family == "cifar":
            out["train"], out["train_stats"] = f32.apply(v, x, train=True, mutable=["batch_stats"])
            out["bf16_train"], out["bf16_stats"] = bf16.apply(
                v, x, train=True, mutable=["batch_stats"]
            )
        else:  # no train-mode golden for ImageNet (and the BN code is shared): bf16 eval mode
            out["bf16_eval"] = bf16.apply(v, x, train=False)
        return out

    out = jax.jit(run)(variables, golden_input(family))
    return jax.tree.map(np.asarray, out)


def assert_close(got, expected, rel, what):
    chex.assert_shape(got, expected.shape)
    err = np.abs(np.asarray(got, np.float64) - expected).max()
    scale = np.abs(expected).max()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize("key", list(ARCHS))
def test_eval_logits_match_reference(key):
    got = outputs(key)["eval"]
    chex.assert_type(got, jnp.float32)
    assert_close(got, GOLDEN[f"{key}/eval_logits"], 1e-4, f"{key} eval logits")


@pytest.mark.parametrize("key", CIFAR)
def test_train_logits_and_first_bn_running_stats_match_reference(key):
    out = outputs(key)
    assert_close(out["train"], GOLDEN[f"{key}/train_logits"], 1e-4, f"{key} train logits")
    family, arch = key.split("/")
    first_bn = next(k for k, _ in ARCHS[key]["state_dict"] if k.endswith("running_mean"))
    path, _ = convert.torch_layout(arch, dataset="cifar100")[first_bn]
    stats = out["train_stats"]
    for comp in path[:-1]:  # ("batch_stats", *module path)
        stats = stats[comp]
    assert_close(stats["mean"], GOLDEN[f"{key}/first_bn_running_mean"], 1e-4, f"{key} {first_bn}")
    assert_close(
        stats["var"], GOLDEN[f"{key}/first_bn_running_var"], 1e-4, f"{key} first running_var"
    )


@pytest.mark.parametrize("key", list(ARCHS))
def test_bfloat16_forward_under_jit(key):
    """bfloat16 compute: float32 logits of the right shape, close to the float32 reference."""
    out = outputs(key)
    family = key.split("/")[0]
    if family == "cifar":  # train mode: batch statistics in float32, running stats updated
        got, ref = out["bf16_train"], GOLDEN[f"{key}/train_logits"]
        assert all(v.dtype == np.float32 for v in jax.tree.leaves(out["bf16_stats"]))
    else:
        got, ref = out["bf16_eval"], GOLDEN[f"{key}/eval_logits"]
    chex.assert_type(got, jnp.float32)
    chex.assert_shape(got, ref.shape)
    assert np.isfinite(got).all()
    # Loose: bfloat16 rounding compounds over depth with these random weights (worst ~0.3 here);
    # a wrong normalization or layout gives errors of order 1.
    assert_close(got, ref, 0.5, f"{key} bfloat16 logits")
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    assert corr > 0.95, f"{key}: bfloat16 logits correlate {corr:.3f} with the float32 reference"

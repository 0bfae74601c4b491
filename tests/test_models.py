"""The model zoo's contract: registry, parameter counts, initialization, PyTorch-semantics
BatchNorm, compute dtype, global-batch statistics under sharding, import without TensorFlow.

The golden comparisons against the reference live in ``test_models_golden.py``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_devices import with_devices
from zkd_jax import models
from zkd_jax.io import torch_weights as convert
from zkd_jax.models import layers

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ARCHS = json.loads((FIXTURES / "architectures.json").read_text())
DATASET = {"cifar": "cifar100", "imagenet": "imagenet"}


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_names_cover_the_reference_architectures():
    expected = {"cifar100": [], "imagenet": []}
    for key in ARCHS:
        family, arch = key.split("/")
        expected[DATASET[family]].append(arch)
    for dataset, archs in expected.items():
        assert models.names(dataset) == archs
    assert models.names() == models.names("cifar100")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown architecture 'resnet9'.*resnet8, resnet14"):
        models.create("resnet9", num_classes=100)
    with pytest.raises(ValueError, match="ResNet34"):  # ImageNet-only name asked for CIFAR
        models.create("ResNet34", num_classes=100, dataset="cifar100")
    with pytest.raises(ValueError, match="MobileNetV1"):
        models.create("MobileNetV2", num_classes=1000, dataset="imagenet")


def test_unknown_dataset_and_bad_num_classes():
    with pytest.raises(ValueError, match="Unknown dataset 'svhn'.*imagenet"):
        models.names("svhn")
    with pytest.raises(ValueError, match="Unknown dataset"):
        models.create("resnet8", num_classes=10, dataset="svhn")
    with pytest.raises(ValueError, match="num_classes"):
        models.create("resnet8", num_classes=0)


@pytest.mark.parametrize("key", list(ARCHS))
def test_parameter_count_and_tensor_count_match_reference(key):
    family, arch = key.split("/")
    model = models.create(
        arch, num_classes=100 if family == "cifar" else 1000, dataset=DATASET[family]
    )
    variables = models.abstract_variables(model)
    assert models.count_params(variables) == ARCHS[key]["num_params"]
    # One-to-one tensors (parameters and running statistics), in the reference's order and shapes.
    torch_layout = [
        (k, tuple(s)) for k, s in ARCHS[key]["state_dict"] if not k.endswith("num_batches_tracked")
    ]
    ours = convert.torch_layout(
        arch, dataset=DATASET[family], num_classes=100 if family == "cifar" else 1000
    )
    assert [(k, shape) for k, (_, shape) in ours.items()] == torch_layout
    assert len(models.flatten(variables)) == len(torch_layout)
    assert all(v.dtype == jnp.float32 for v in models.flatten(variables).values())


def test_bfloat16_model_keeps_float32_parameters():
    model = models.create("resnet8", num_classes=10, dtype=jnp.bfloat16)
    variables = models.abstract_variables(model)
    assert {v.dtype for v in models.flatten(variables).values()} == {jnp.dtype(jnp.float32)}


# --------------------------------------------------------------------------------------------------
# Initialization (the reference code's, per family)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def initialized():
    """Fresh variables of one architecture per initialization scheme (jitted init, 2 images).

    The "rbg" PRNG only makes the jitted init compile faster on CPU than threefry does; the
    initializers' distributions are the same.
    """
    out = {}
    for arch, dataset in [
        ("resnet8x4", "cifar100"),
        ("vgg8", "cifar100"),
        ("wrn_16_2", "cifar100"),
        ("MobileNetV2", "cifar100"),
        ("ShuffleV2", "cifar100"),
        ("MobileNetV1", "imagenet"),
    ]:
        model = models.create(arch, num_classes=100, dataset=dataset)
        x = jnp.zeros((2, 32, 32, 3))
        key = jax.random.key(0, impl="rbg")
        out[arch] = jax.jit(lambda k, x, m=model: m.init(k, x, train=False))(key, x)
    return out


def _std_close(a, std, rtol=0.06):
    a = np.asarray(a)
    assert abs(a.mean()) < 4 * std / math.sqrt(a.size) + 1e-7
    assert abs(a.std() / std - 1) < rtol, (a.std(), std)


def _uniform_bound(a, bound):
    a = np.asarray(a)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.9 * bound  # spread over the whole interval, not a narrower one
    np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.15)


def test_init_he_normal_fan_out_convs_and_default_classifier(initialized):
    p = initialized["resnet8x4"]["params"]
    k = p["layer3_0"]["conv2"]["kernel"]  # 3x3, 256 -> 256
    _std_close(k, math.sqrt(2 / (256 * 9)))
    _std_close(p["layer1_0"]["downsample_0"]["kernel"], math.sqrt(2 / 64))  # 1x1, 32 -> 64
    _uniform_bound(p["fc"]["kernel"], 1 / math.sqrt(256))
    _uniform_bound(p["fc"]["bias"], 1 / math.sqrt(256))
    bs = initialized["resnet8x4"]["batch_stats"]["bn1"]
    np.testing.assert_array_equal(p["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(p["bn1"]["bias"], 0.0)
    np.testing.assert_array_equal(bs["mean"], 0.0)
    np.testing.assert_array_equal(bs["var"], 1.0)


def test_init_vgg_and_mobilenetv2_classifiers_normal_001(initialized):
    vgg = initialized["vgg8"]["params"]
    _std_close(vgg["block3_0"]["kernel"], math.sqrt(2 / (512 * 9)))
    np.testing.assert_array_equal(vgg["block3_0"]["bias"], 0.0)
    _std_close(vgg["classifier"]["kernel"], 0.01)
    np.testing.assert_array_equal(vgg["classifier"]["bias"], 0.0)
    mb = initialized["MobileNetV2"]["params"]
    _std_close(mb["classifier_0"]["kernel"], 0.01)
    np.testing.assert_array_equal(mb["classifier_0"]["bias"], 0.0)
    dw = mb["blocks_5_1"]["conv_3"]["kernel"]  # depthwise 3x3 over 480 channels: fan_out = 480 * 9
    assert dw.shape == (3, 3, 1, 480)
    _std_close(dw, math.sqrt(2 / (480 * 9)))


def test_init_wrn_classifier_uniform_weight_zero_bias(initialized):
    p = initialized["wrn_16_2"]["params"]
    _std_close(p["block3"]["layer_1"]["conv1"]["kernel"], math.sqrt(2 / (128 * 9)))
    _uniform_bound(p["fc"]["kernel"], 1 / math.sqrt(128))
    np.testing.assert_array_equal(p["fc"]["bias"], 0.0)


def test_init_pytorch_default_where_reference_sets_none(initialized):
    s = initialized["ShuffleV2"]["params"]
    _uniform_bound(s["layer2_3"]["conv1"]["kernel"], 1 / math.sqrt(116))  # 1x1, 116 -> 116
    _uniform_bound(s["conv2"]["kernel"], 1 / math.sqrt(464))
    _uniform_bound(s["linear"]["kernel"], 1 / math.sqrt(1024))
    m = initialized["MobileNetV1"]["params"]
    _uniform_bound(m["model_13_3"]["kernel"], 1 / math.sqrt(1024))
    _uniform_bound(m["model_12_0"]["kernel"], 1 / math.sqrt(9))  # depthwise: fan_in = 1 * 3 * 3


# --------------------------------------------------------------------------------------------------
# BatchNorm with PyTorch semantics
# --------------------------------------------------------------------------------------------------


def _bn_reference(x, scale, bias, mean, var, momentum=0.1, eps=1e-5):
    """NumPy float64 reference of torch.nn.BatchNorm2d in train mode (NHWC)."""
    x = x.astype(np.float64)
    n = x.size // x.shape[-1]
    mu = x.mean(axis=(0, 1, 2))
    v = x.var(axis=(0, 1, 2))  # biased
    y = (x - mu) / np.sqrt(v + eps) * scale + bias
    new_mean = (1 - momentum) * mean + momentum * mu
    new_var = (1 - momentum) * var + momentum * v * n / (n - 1)
    return y, new_mean, new_var


def test_batchnorm_train_and_eval_match_pytorch_semantics():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 4, 5, 6)) * 2 + 1).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, 6), rng.standard_normal(6)
    mean, var = rng.standard_normal(6), rng.uniform(0.5, 2.0, 6)
    variables = {
        "params": {
            "scale": jnp.asarray(scale, jnp.float32),
            "bias": jnp.asarray(bias, jnp.float32),
        },
        "batch_stats": {
            "mean": jnp.asarray(mean, jnp.float32),
            "var": jnp.asarray(var, jnp.float32),
        },
    }
    bn = layers.BatchNorm()
    y, upd = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    y_ref, mean_ref, var_ref = _bn_reference(x, scale, bias, mean, var)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var_ref, rtol=1e-5)  # unbiased update
    y_eval = bn.apply(variables, x, train=False)
    np.testing.assert_allclose(y_eval, (x - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=1e-5)
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn.apply(variables, x[:1, :1, :1], train=True, mutable=["batch_stats"])


def test_batchnorm_bfloat16_statistics_in_float32():
    rng = np.random.default_rng(1)
    # A large offset: statistics accumulated in bfloat16 would lose the small spread around it.
    x = (100.0 + rng.standard_normal((4, 8, 8, 3))).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    bn = layers.BatchNorm(dtype=jnp.bfloat16)
    variables = bn.init(jax.random.key(0), xb, train=False)
    y, upd = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, xb
    )
    chex.assert_type(y, jnp.bfloat16)
    chex.assert_type(upd["batch_stats"]["var"], jnp.float32)
    y_ref, mean_ref, var_ref = _bn_reference(np.asarray(xb, np.float32), 1.0, 0.0, 0.0, 1.0)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=0.05)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var_ref, rtol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean_ref, rtol=1e-5)


def test_compute_dtype_is_bfloat16_for_convolutions():
    model = models.create("resnet8", num_classes=10, dtype=jnp.bfloat16)
    variables = models.abstract_variables(model)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, jnp.zeros((2, 32, 32, 3))
    )
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 9
    assert all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
    logits, _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        variables,
        jnp.zeros((2, 32, 32, 3)),
    )
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10)


# --------------------------------------------------------------------------------------------------
# Processes of their own: sharded statistics, no TensorFlow
# --------------------------------------------------------------------------------------------------


def _run_python(code: str, env_extra: dict[str, str] | None = None) -> str:
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sharded_batch_gives_global_batch_statistics():
    out = _run_python(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from zkd_jax import models
        from zkd_jax.io import torch_weights as convert
        assert jax.device_count() == 4, jax.devices()
        model = models.create("resnet8", num_classes=10)
        x = np.random.default_rng(0).standard_normal((8, 16, 16, 3)).astype(np.float32)
        variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
        f = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
        ref_logits, ref_upd = f(variables, x)
        mesh = jax.make_mesh((4,), ("data",))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        logits, upd = f(variables, xs)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(ref_upd)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # Per-shard statistics would differ: one shard's first-BN variance is not the global one.
        one = f(variables, x[:2])[1]["batch_stats"]["bn1"]["var"]
        assert not np.allclose(one, upd["batch_stats"]["bn1"]["var"], rtol=1e-3)
        print("ok")
        """,
        {"XLA_FLAGS": with_devices(4), "JAX_PLATFORMS": "cpu"},
    )
    assert out.strip().endswith("ok")


def test_models_import_and_run_without_tensorflow():
    out = _run_python(
        """
        import sys
        sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
        import jax, jax.numpy as jnp
        import zkd_jax.models as models
        m = models.create("resnet8", num_classes=10)
        v = m.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
        print(m.apply(v, jnp.zeros((2, 32, 32, 3)), train=False).shape)
        banned = ("tensorflow", "torch")
        print(sorted(k for k in sys.modules if k.split(".")[0] in banned and sys.modules[k]))
        """
    )
    assert out.split("\n")[:2] == ["(2, 10)", "[]"]

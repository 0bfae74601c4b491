"""Tests of zkd_jax.losses against the reference's golden values, plus variants and robustness."""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from zkd_jax import losses

GOLDEN = np.load(pathlib.Path(__file__).parent / "fixtures" / "losses_golden.npz")
FAMILIES = ("small", "cifar", "imagenet")
MODES = ("plain", "ls")
# Relative error = max |ours - reference| / max |reference| (per value or gradient array).
TOLERANCE = {"float64": 1e-6, "float32": 1e-4}


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


INPUTS = ("student", "teacher", "target", "student_strong", "teacher_strong", "ctkd/global_t_init")


def _inputs(inputs: dict):
    g = inputs.__getitem__
    return g("student"), g("teacher"), g("target"), g


def _golden_cases():
    """(id, fn(inputs, family) -> list of (ours, reference key without the family)); ``inputs``
    maps the names of ``INPUTS`` to the family's arrays."""

    def kd(mode, temp):
        def run(inputs, family):
            s, t, _, _ = _inputs(inputs)
            fn = lambda x: losses.kd_loss(x, t, float(temp), standardize=mode == "ls")  # noqa: E731
            value, grad = jax.value_and_grad(fn)(s)
            key = f"kd/{mode}/T{temp}"
            return [(value, f"{key}/value"), (grad, f"{key}/grad")]

        return run

    def dkd(mode, alpha, beta, temp):
        def run(inputs, family):
            s, t, y, _ = _inputs(inputs)
            fn = lambda x: losses.dkd_loss(  # noqa: E731
                x, t, y, alpha=alpha, beta=beta, temperature=float(temp), standardize=mode == "ls"
            )
            value, grad = jax.value_and_grad(fn)(s)
            key = f"dkd/{mode}/a{alpha}_b{beta}_T{temp}"
            return [(value, f"{key}/value"), (grad, f"{key}/grad")]

        return run

    def correlation(name, temp):
        fn_loss = {"cc": losses.cc_loss, "bc": losses.bc_loss}[name]

        def run(inputs, family):
            s, t, _, _ = _inputs(inputs)
            value, grad = jax.value_and_grad(lambda x: fn_loss(x, t, float(temp)))(s)
            key = f"mlkd_{name}/T{temp}"
            return [(value, f"{key}/value"), (grad, f"{key}/grad")]

        return run

    def mlkd(mode):
        def run(inputs, family):
            s, t, y, g = _inputs(inputs)
            key = f"mlkd_total/{mode}"
            scalar = lambda n: float(GOLDEN[f"{family}/{key}/{n}"])  # noqa: E731

            def fn(weak, strong):
                return losses.mlkd_loss(
                    weak, strong, t, g("teacher_strong"), y,
                    temperature=scalar("temperature"), ce_weight=scalar("ce_weight"),
                    kd_weight=scalar("kd_weight"), standardize=mode == "ls",
                )

            out = fn(s, g("student_strong"))
            grad_weak, grad_strong = jax.grad(lambda a, b: fn(a, b)["total"], argnums=(0, 1))(
                s, g("student_strong")
            )
            pairs = [(out[n], f"{key}/loss_{n}") for n in ("ce", "kd", "cc", "bc")]
            return pairs + [
                (out["total"], f"{key}/value"),
                (grad_weak, f"{key}/grad_weak"),
                (grad_strong, f"{key}/grad_strong"),
            ]

        return run

    def ctkd(mode, lam):
        def run(inputs, family):
            s, t, _, g = _inputs(inputs)

            def fn(x, g):
                temp = losses.ctkd_temperature(g, float(lam))
                return losses.kd_loss(x, t, temp, standardize=mode == "ls"), temp

            (value, temp), (grad_s, grad_t) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
                s, g("ctkd/global_t_init")
            )
            key = f"ctkd/{mode}/lambda{lam}"
            pairs = [(value, f"{key}/value"), (temp, f"{key}/temperature"), (grad_s, f"{key}/grad_student")]
            # lambda 0 blocks the temperature's gradient entirely (test_ctkd_curriculum).
            if float(lam) != 0.0:
                pairs.append((grad_t, f"{key}/grad_global_t"))
            return pairs

        return run

    def zscore(inputs, family):
        s, _, _, _ = _inputs(inputs)
        return [(losses.standardize(s), "zscore/student")]

    cases = [("zscore", zscore)]
    for mode in MODES:
        cases += [(f"kd-{mode}-T{temp}", kd(mode, temp)) for temp in (1, 2, 4)]
        cases += [(f"dkd-{mode}-a1b8T4", dkd(mode, 1, 8, 4)), (f"dkd-{mode}-a9b72T2", dkd(mode, 9, 72, 2))]
        cases += [(f"mlkd-{mode}", mlkd(mode))]
        cases += [(f"ctkd-{mode}-lambda{lam}", ctkd(mode, lam)) for lam in ("0", "-0.5", "-1")]
    for temp in (2, 4):
        cases += [(f"cc-T{temp}", correlation("cc", temp)), (f"bc-T{temp}", correlation("bc", temp))]
    return cases


GOLDEN_CASES = _golden_cases()


def _golden_inputs(family: str, dtype) -> dict:
    return {n: jnp.asarray(GOLDEN[f"{family}/{n}"], jnp.int32 if n == "target" else dtype)
            for n in INPUTS}


@functools.cache
def golden_outputs(family: str, precision: str) -> dict[str, list[tuple[np.ndarray, str]]]:
    """Case id -> [(ours, golden key)] for one family and precision, from ONE jitted program whose
    arguments are the golden inputs (one compile, where op-by-op evaluation compiles dozens of
    small programs per case); ``VariantTest`` checks that jit and no jit agree. The keys are
    collected while the program is traced."""
    dtype = jnp.dtype(precision)
    keys: dict[str, list[str]] = {}

    def every_case(inputs):
        values = {}
        for name, run in GOLDEN_CASES:
            pairs = run(inputs, family)
            keys[name] = [f"{family}/{k}" for _, k in pairs]
            values[name] = [v for v, _ in pairs]
        return values

    with jax.enable_x64(precision == "float64"):
        values = jax.jit(every_case)(_golden_inputs(family, dtype))
    return {name: [(np.asarray(v), k) for v, k in zip(values[name], keys[name], strict=True)]
            for name in values}


def test_every_golden_entry_is_checked():
    """The golden file holds nothing that the parametrized cases below do not compare."""
    checked = {key for family in FAMILIES for pairs in golden_outputs(family, "float32").values()
               for _, key in pairs}
    inputs = {"student", "teacher", "target", "student_strong", "teacher_strong"}
    hyper = {"temperature", "ce_weight", "kd_weight"}
    expected = {
        k for k in GOLDEN.files
        if k.split("/", 1)[1] not in inputs and k.rsplit("/", 1)[1] not in hyper
        and not k.endswith("global_t_init") and not k.endswith("lambda0/grad_global_t")
    }
    assert expected - checked == set()
    assert len(checked) > 100


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,run", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_matches_reference(name, run, family, precision):
    with jax.enable_x64(precision == "float64"):
        pairs = golden_outputs(family, precision)[name]
        assert pairs
        for ours, key in pairs:
            assert np.asarray(ours).dtype == np.dtype(precision), key
            err = relative_error(ours, GOLDEN[key])
            assert err <= TOLERANCE[precision], f"{key}: relative error {err:.3g}"


def _random_logits(key, shape, scale=3.0):
    k1, k2, k3 = jax.random.split(key, 3)
    s = scale * jax.random.normal(k1, shape)
    t = scale * jax.random.normal(k2, shape)
    y = jax.random.randint(k3, shape[:-1], 0, shape[-1])
    return s, t, y


# Every loss as fn(student, teacher, labels) -> scalar, for the variant tests.
SCALAR_LOSSES = {
    "kd": lambda s, t, y: losses.kd_loss(s, t, 4.0),
    "kd_ls": lambda s, t, y: losses.kd_loss(s, t, 2.0, standardize=True),
    "dkd": lambda s, t, y: losses.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0),
    "dkd_ls": lambda s, t, y: losses.dkd_loss(s, t, y, alpha=9.0, beta=72.0, temperature=2.0, standardize=True),
    "cc": lambda s, t, y: losses.cc_loss(s, t, 4.0),
    "bc": lambda s, t, y: losses.bc_loss(s, t, 4.0),
    "mlkd_ls": lambda s, t, y: losses.mlkd_loss(
        s, 0.5 * s, t, 0.7 * t, y, temperature=2.0, ce_weight=0.1, kd_weight=9.0, standardize=True
    )["total"],
    "ctkd_ls": lambda s, t, y: losses.kd_loss(
        s, t, losses.ctkd_temperature(jnp.float32(1.0), -0.5), standardize=True
    ),
    "cross_entropy": lambda s, t, y: losses.cross_entropy(s, y),
}
LOSS_PARAMS = [(name, name) for name in SCALAR_LOSSES]


class VariantTest(chex.TestCase):
    """Same values with and without jit, under vmap, and on [batch, seq, classes] with a mask."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*LOSS_PARAMS)
    def test_jit_and_no_jit_agree(self, name):
        s, t, y = _random_logits(jax.random.PRNGKey(0), (16, 10))
        expected = SCALAR_LOSSES[name](s, t, y)
        got = self.variant(SCALAR_LOSSES[name])(s, t, y)
        chex.assert_shape(got, ())
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        grad = self.variant(jax.grad(SCALAR_LOSSES[name]))(s, t, y)
        chex.assert_tree_all_finite(grad)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*LOSS_PARAMS)
    def test_vmap_over_leading_axis(self, name):
        s, t, y = _random_logits(jax.random.PRNGKey(1), (3, 16, 10))
        batched = self.variant(jax.vmap(SCALAR_LOSSES[name]))(s, t, y)
        chex.assert_shape(batched, (3,))
        for i in range(3):
            np.testing.assert_allclose(batched[i], SCALAR_LOSSES[name](s[i], t[i], y[i]), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sequence_logits_with_mask(self):
        """[batch, seq, vocab] with padding: equals the 2-D loss over the unmasked rows only."""
        s, t, y = _random_logits(jax.random.PRNGKey(2), (4, 7, 33))
        where = jnp.arange(7)[None, :] < jnp.array([7, 3, 5, 1])[:, None]
        # Garbage in padded rows must not leak into the result.
        s = jnp.where(where[..., None], s, 1e3)
        rows = np.asarray(where).reshape(-1)
        flat = lambda a: a.reshape((-1,) + a.shape[2:])[rows]  # noqa: E731
        cases = {
            "kd": lambda a, b, w: losses.kd_loss(a, b, 3.0, where=w),
            "kd_ls": lambda a, b, w: losses.kd_loss(a, b, 2.0, standardize=True, where=w),
            "dkd_ls": lambda a, b, w: losses.dkd_loss(
                a, b, y if w is not None else flat(y), alpha=1.0, beta=8.0, temperature=2.0,
                standardize=True, where=w,
            ),
            "cross_entropy": lambda a, b, w: losses.cross_entropy(a, y if w is not None else flat(y), where=w),
        }
        for name, fn in cases.items():
            got = self.variant(fn)(s, t, where)
            expected = fn(flat(s), flat(t), None)
            np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=name)
            grad = jax.jit(jax.grad(fn))(s, t, where)
            np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(where)], 0.0, err_msg=name)


@pytest.mark.parametrize("name", list(SCALAR_LOSSES))
def test_constant_row_gives_finite_loss_and_gradient(name):
    s, t, y = _random_logits(jax.random.PRNGKey(3), (8, 10))
    s = s.at[2].set(1.5)  # std 0 in the student ...
    t = t.at[5].set(-2.0)  # ... and in the teacher
    value, grad = jax.value_and_grad(SCALAR_LOSSES[name])(s, t, y)
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grad)


def test_constant_row_leaves_other_values_unchanged():
    """The safe std only changes the derivative at std == 0: Z of other rows is the plain formula."""
    x = jnp.array([[1.0, 2.0, 4.0, 8.0], [3.0, 3.0, 3.0, 3.0]], jnp.float32)
    z = losses.standardize(x)
    ref = (x[0] - x[0].mean()) / (np.std(np.asarray(x[0]), ddof=1) + 1e-7)
    np.testing.assert_allclose(z[0], ref, rtol=1e-5)
    np.testing.assert_array_equal(z[1], 0.0)


@pytest.mark.parametrize("name", list(SCALAR_LOSSES))
def test_huge_logits_are_finite(name):
    s, t, y = _random_logits(jax.random.PRNGKey(4), (8, 10), scale=1e4)
    value, grad = jax.value_and_grad(SCALAR_LOSSES[name])(s, t, y)
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grad)


def test_all_false_mask_gives_zero():
    s, t, y = _random_logits(jax.random.PRNGKey(5), (4, 6, 10))
    where = jnp.zeros((4, 6), bool)
    for fn in (
        lambda a: losses.kd_loss(a, t, 2.0, standardize=True, where=where),
        lambda a: losses.dkd_loss(a, t, y, alpha=1.0, beta=8.0, temperature=4.0, where=where),
        lambda a: losses.cross_entropy(a, y, where=where),
    ):
        value, grad = jax.jit(jax.value_and_grad(fn))(s)
        assert float(value) == 0.0
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(SCALAR_LOSSES))
def test_half_precision_inputs_match_float32(name, half):
    s, t, y = _random_logits(jax.random.PRNGKey(6), (16, 10))
    s_half, t_half = s.astype(half), t.astype(half)
    got = SCALAR_LOSSES[name](s_half, t_half, y)
    chex.assert_type(got, jnp.float32)
    # Same (rounded) inputs in float32: the only difference left is the computation's precision.
    expected = SCALAR_LOSSES[name](s_half.astype(jnp.float32), t_half.astype(jnp.float32), y)
    np.testing.assert_allclose(got, expected, rtol=1e-2)
    # And against the unrounded float32 logits, the loss moves by no more than the rounding.
    np.testing.assert_allclose(got, SCALAR_LOSSES[name](s, t, y), rtol=5e-2)


def test_teacher_receives_no_gradient_and_temperature_does():
    s, t, _ = _random_logits(jax.random.PRNGKey(7), (8, 10))
    for standardize in (False, True):
        grad_t = jax.grad(lambda b: losses.kd_loss(s, b, 4.0, standardize=standardize))(t)
        np.testing.assert_array_equal(grad_t, 0.0)
        grad_temp = jax.grad(lambda T: losses.kd_loss(s, t, T, standardize=standardize))(4.0)
        assert np.isfinite(grad_temp) and grad_temp != 0.0


def test_gradient_reversal():
    f = lambda x, lam: jnp.sum(losses.gradient_reversal(x, lam) ** 2)  # noqa: E731
    x = jnp.array([1.0, -2.0, 3.0])
    np.testing.assert_array_equal(losses.gradient_reversal(x, -0.7), x)
    np.testing.assert_allclose(jax.grad(f)(x, -0.7), -0.7 * 2 * x, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x, 0.25), 0.25 * 2 * x, rtol=1e-6)


def test_ctkd_curriculum():
    got = np.asarray([losses.ctkd_lambda(e) for e in (0, 5, 10, 11, 240)])
    np.testing.assert_allclose(got, [0.0, -0.5, -1.0, -1.0, -1.0], atol=1e-6)
    traced = jax.jit(losses.ctkd_lambda)(jnp.int32(5))
    np.testing.assert_allclose(traced, -0.5, atol=1e-6)
    grad = jax.grad(lambda g: losses.kd_loss(jnp.ones((2, 3)), jnp.eye(2, 3), losses.ctkd_temperature(g, 0.0)))
    assert float(grad(jnp.float32(0.3))) == 0.0
    temp = losses.ctkd_temperature(jnp.float32(0.0), -1.0)
    np.testing.assert_allclose(temp, 11.0, rtol=1e-6)  # 1 + 20 * sigmoid(0)


def test_imports_without_tensorflow():
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "import zkd_jax, zkd_jax.losses\n"
        "assert 'tensorflow' not in {m for m, v in sys.modules.items() if v is not None}\n"
        "print(float(zkd_jax.kd_loss([[1.0, 2.0]], [[2.0, 1.0]], 2.0, standardize=True)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert np.isfinite(float(result.stdout.strip().splitlines()[-1]))

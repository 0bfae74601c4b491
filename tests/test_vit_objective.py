"""The ViT students' objective against the reference (``fixtures/losses_vit_golden.npz``).

``0.5 CE(cls) + w T^2 KL(Z(t)/T || Z(s)/T)`` with its gradients, float64 to 1e-6 relative (the
constant-row ``edge`` case included) and float32 to 1e-4; plus the method wrapper.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax import losses, methods

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
G = np.load(FIXTURES / "losses_vit_golden.npz")
RTOL = {"float64": 1e-6, "float32": 1e-4}
SWEEP = sorted({k.split("/")[1] for k in G.files if k.startswith("sweep/")})


def close(got, want, rtol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want)
    err = float(np.max(np.abs(got - want)))
    assert err <= rtol * float(np.max(np.abs(want))), f"{what}: error {err:.3g}"


def cast(*arrays, dtype):
    return [jnp.asarray(a, dtype) for a in arrays]


@functools.partial(jax.jit, static_argnames="shared")
def _objective_and_grads(s_cls, s_dist, t, temperature, logit_weight, extra_weight, *, shared):
    def f(s_cls, s_dist):
        return methods.vit_kd_objective(
            s_cls, s_cls if shared else s_dist, t, G["labels"], temperature=temperature,
            logit_weight=logit_weight, extra_weight=extra_weight)

    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(s_cls, s_dist)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("case", ["deit_kd_ours", "shared_head_kd_ours_w9",
                                  "shared_head_kd_ours_w10"])
def test_objective_and_gradients(case, precision):
    rtol = RTOL[precision]
    shared = case.startswith("shared")
    with jax.enable_x64(precision == "float64"):
        s_cls, s_dist, t = cast(G["student_cls"], G["student_dist"], G["teacher"],
                                dtype=precision)
        settings = cast(G[f"{case}/T"], G[f"{case}/logit_weight"], G[f"{case}/extra_weight_in"],
                        dtype=precision)
        (loss, terms), grads = _objective_and_grads(s_cls, s_dist, t, *settings, shared=shared)
        assert loss.dtype == jnp.dtype(precision)
        close(loss, G[f"{case}/loss"], rtol, "loss")
        close(terms["ce"], G[f"{case}/ce_unscaled"], rtol, "ce")
        close(terms["cls_loss"], G[f"{case}/cls_loss"], rtol, "cls_loss")
        close(terms["logit_distill_loss"], G[f"{case}/logit_distill_loss"], rtol, "kd")
        if shared:
            close(grads[0], G[f"{case}/grad_student_cls"], rtol, "grad cls")
        else:
            close(grads[0], G[f"{case}/grad_student_cls"], rtol, "grad cls")
            close(grads[1], G[f"{case}/grad_student_dist"], rtol, "grad dist")


@functools.partial(jax.jit, static_argnames="standardize")
def _kd_and_grad(student, teacher, temperature, weight, standardize):
    """One compile per (dtype, standardize): T and w are traced."""
    return jax.value_and_grad(_kd_term)(student, teacher, temperature, weight, standardize)


def _kd_term(student, teacher, temperature, weight, standardize):
    return methods.vit_kd_objective(
        student, student, teacher, G["labels"], temperature=temperature, ce_weight=0.0,
        extra_weight=weight, standardize=standardize)[1]["logit_distill_loss"]


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_kd_sweep_and_edge(precision):
    """KD term alone over T and w, standardized and raw (``sweep``: the distillation head), and
    the constant-logit rows of ``edge`` (student rows 0-1, a teacher row), T 2, w 10."""
    rtol = RTOL[precision]
    with jax.enable_x64(precision == "float64"):
        s, t = cast(G["student_dist"], G["teacher"], dtype=precision)
        for case in SWEEP:
            temp, w, kind = case.split("_")
            kd, grad = _kd_and_grad(s, t, *cast(float(temp[1:]), float(w[1:]), dtype=precision),
                                    standardize=kind == "std")
            close(kd, G[f"sweep/{case}/kd"], rtol, f"{case} kd")
            close(grad, G[f"sweep/{case}/grad_student"], rtol, f"{case} grad")
        es, et = cast(G["edge/student"], G["edge/teacher"], dtype=precision)
        kd, grad = _kd_and_grad(es, et, *cast(2.0, 10.0, dtype=precision), standardize=True)
        assert bool(jnp.all(jnp.isfinite(grad)))
        close(kd, G["edge/kd_T2_w10"], rtol, "edge kd")
        close(grad, G["edge/grad_student"], rtol, "edge grad")


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_standardize_vjp(precision):
    with jax.enable_x64(precision == "float64"):
        x, ct = cast(G["normalize/input"], G["normalize/cotangent"], dtype=precision)
        out, vjp = jax.vjp(losses.standardize, x)
        close(out, G["normalize/output"], RTOL[precision], "Z(x)")
        close(vjp(ct)[0], G["normalize/grad_input"], RTOL[precision], "VJP")


def test_method_heads_and_errors():
    s_cls, s_dist, t = cast(G["student_cls"], G["student_dist"], G["teacher"], dtype="float32")
    labels = jnp.asarray(G["labels"])
    deit = methods.from_config({"name": "vit_kd", "extra_weight": 10.0})
    loss, terms = deit.objective({}, {"weak": s_cls, methods.DIST_VIEW: s_dist}, {"weak": t},
                                 labels, jnp.int32(1))
    close(loss, G["deit_kd_ours/loss"], 1e-4, "deit method loss")
    assert set(terms) == {"ce", "cls_loss", "logit_distill_loss"}
    shared = methods.ViTKD(extra_weight=9.0, kd_head="cls")
    loss, _ = shared.objective({}, {"weak": s_cls}, {"weak": t}, labels, jnp.int32(1))
    close(loss, G["shared_head_kd_ours_w9/loss"], 1e-4, "shared-head method loss")
    with pytest.raises(ValueError, match="distillation head"):
        deit.objective({}, {"weak": s_cls}, {"weak": t}, labels, jnp.int32(1))
    with pytest.raises(ValueError, match="kd_head"):
        methods.ViTKD(kd_head="both")

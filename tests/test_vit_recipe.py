"""The ViT recipe's math: per-epoch learning rates, weight-decay groups, AdamW, the teacher's
32-px input (``fixtures/architectures_vit.json``, ``models_vit_golden.npz``)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax import models, optim
from zkd_jax.io import torch_weights as convert
from zkd_jax.step import TeacherCall
from zkd_jax.views import teacher_input

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ARCHS = json.loads((FIXTURES / "architectures_vit.json").read_text())
STUDENTS = ["deit_ti", "t2t_vit_7", "pit_ti", "pvt_ti"]
VIT_LR = dict(base_lr=5e-4, max_epoch=300, min_lr=5e-6, warmup_epochs=20, warmup_factor=1e-3)
TEACHER_LR = dict(base_lr=0.1, max_epoch=300, min_lr=0.0, warmup_epochs=0)


@pytest.mark.parametrize("name", [*STUDENTS, "resnet56"])
def test_lr_per_epoch(name):
    kw = TEACHER_LR if name == "resnet56" else VIT_LR
    got = [optim.cosine_warmup_lr(e, **kw) for e in range(300)]
    np.testing.assert_allclose(got, ARCHS[name]["lr_per_epoch"], rtol=1e-12, atol=0)


def test_per_epoch_schedule_steps_at_epoch_ends():
    rates = [optim.cosine_warmup_lr(e, **VIT_LR) for e in range(300)]
    sched = optim.per_epoch_schedule(rates, steps_per_epoch=390)
    for count, epoch in [(0, 0), (389, 0), (390, 1), (7800, 20), (10**6, 299)]:
        assert float(sched(count)) == np.float32(rates[epoch])


@pytest.mark.parametrize("name", [*STUDENTS, "resnet56"])
def test_weight_decay_groups(name):
    dataset = "cifar100" if name == "resnet56" else "cifar100_224"
    layout = convert.torch_layout(name, dataset=dataset)
    abstract = models.abstract_variables(
        models.create(name, num_classes=100, dataset=dataset),
        image_hw=models.image_shape(dataset)[:2])
    mask = models.flatten(optim.vit_decay_mask(abstract["params"]))
    groups = ARCHS[name]["weight_decay_groups"]

    def reference(group):
        keys = [k.removeprefix("student_model.") for k in groups[group]]
        keys = [k for k in keys if not k.startswith("feature_transforms.")]  # unused, omitted
        return set(convert.rename_pycls_resnet(dict.fromkeys(keys)))

    decayed = {k for k, (path, _) in layout.items() if path[0] == "params"
               and mask["/".join(path[1:])]}
    trained = {k for k, (path, _) in layout.items() if path[0] == "params"}
    assert decayed == reference("body_decay") | reference("head_decay")
    assert trained - decayed == reference("body_no_decay") | reference("head_no_decay")


def test_adamw_is_torch_adamw():
    """Two steps against torch.optim.AdamW's update written out (decoupled decay on kernels only)."""
    params = {"dense": {"kernel": jnp.array([[0.5, -1.0], [2.0, 0.1]]), "bias": jnp.array([0.3, -0.2])},
              "cls_token": jnp.ones((1, 1, 2))}
    grads = jax.tree.map(lambda p: 0.1 * p + 0.05, params)
    lr, wd, b1, b2, eps = 1e-2, 0.05, 0.9, 0.999, 1e-8
    tx = optim.adamw(lr, weight_decay=wd)
    state = tx.init(params)
    p_ref = jax.tree.map(np.asarray, params)
    m = jax.tree.map(np.zeros_like, p_ref)
    v = jax.tree.map(np.zeros_like, p_ref)
    p = params
    decay = {"dense": {"kernel": True, "bias": False}, "cls_token": False}
    for t in (1, 2):
        updates, state = tx.update(grads, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        g = jax.tree.map(np.asarray, grads)
        m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
        p_ref = jax.tree.map(
            lambda p_, m_, v_, d: p_ * (1 - lr * wd * d)
            - lr * (m_ / (1 - b1**t)) / (np.sqrt(v_ / (1 - b2**t)) + eps), p_ref, m, v, decay)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # float32 rounding


def test_teacher_input_is_the_documented_pixel_pick():
    golden = np.load(FIXTURES / "models_vit_golden.npz")
    x = golden["input_nchw"].transpose(0, 2, 3, 1)
    got = np.asarray(teacher_input(jnp.asarray(x)))
    np.testing.assert_array_equal(got, golden["teacher/input_nchw"].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(got, x[:, 3::7, 3::7])
    with pytest.raises(ValueError, match="multiple of 32"):
        teacher_input(jnp.zeros((1, 100, 100, 3)))


@pytest.mark.parametrize("arg, name", [("kd_ls,resnet56,deit_ti", "deit_ti"),
                                       ("teacher,resnet56", "resnet56")])
def test_the_trainer_reads_the_recipe_of_the_configs(arg, name):
    """``trainer.recipe``: the rate logged per epoch and the optimizer's schedule are the json's
    (epoch e + 1 of the run is the reference's epoch e); the ViT images and the teacher's view."""
    from zkd_jax.configs import cifar100_vit
    from zkd_jax.trainer import recipe

    config = cifar100_vit.get_config(arg)
    rates = ARCHS[name]["lr_per_epoch"]
    lr = recipe.lr_for_epoch(config.optimizer, config.epochs)
    np.testing.assert_allclose([lr(e + 1) for e in range(300)], rates, rtol=1e-12)
    schedule, tx = recipe.make_optimizer(config.optimizer, steps_per_epoch=390,
                                         epochs=config.epochs)
    for e in (0, 19, 20, 299):
        assert float(schedule(390 * e)) == float(schedule(390 * e + 389)) == np.float32(rates[e])
    params = {"w": jnp.ones((2, 2)), "bias": jnp.ones((2,))}  # the decay mask: no decay on bias
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert float(jnp.abs(updates["bias"]).max()) == 0.0 < float(jnp.abs(updates["w"]).min())
    images = recipe.images(config, 32)
    if name == "deit_ti":
        assert (images.student_shape, images.teacher_shape) == ((224, 224, 3), (32, 32, 3))
        assert (images.augmentation, images.teacher_call) == ("vit", TeacherCall(32, True))
    else:  # the teacher recipe: 32 px, the same strong pipeline
        assert (images.student_shape, images.augmentation) == ((32, 32, 3), "vit")

"""The demo's learning-rate schedule (a warm-up then a cosine, update by update, over the run's own
length) and the suite table's footer, computed from the config and the results (no training)."""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import pytest

from zkd_jax import optim
from zkd_jax.trainer import suite_table
from zkd_jax.configs import demo as demo_config
from zkd_jax.trainer import recipe, validate


def _reference(n, lr, total, warm, min_lr=0.0):
    """The formula written out again, independently: linear ramp to ``lr``, then a half cosine."""
    if n < warm:
        return lr * (n + 1) / warm
    t = min((n - warm) / (total - warm), 1.0)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("total,warm,min_lr", [(230, 46, 0.0), (138, 46, 0.001), (50, 0, 0.0)])
def test_warmup_cosine_host_and_device_agree_with_the_formula(total, warm, min_lr):
    sched = optim.warmup_cosine_schedule(0.05, total_steps=total, warmup_steps=warm, min_lr=min_lr)
    counts = np.arange(total + 3)  # past the end: held at min_lr
    host = [optim.warmup_cosine_lr(int(n), lr=0.05, total_steps=total, warmup_steps=warm,
                                   min_lr=min_lr) for n in counts]
    want = [_reference(int(n), 0.05, total, warm, min_lr) for n in counts]
    np.testing.assert_allclose(host, want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(np.asarray(sched(counts)), want, rtol=2e-6, atol=1e-9)
    assert max(host) == pytest.approx(0.05) and host[-1] == pytest.approx(min_lr)
    if warm:
        assert host[0] == pytest.approx(0.05 / warm) and host[warm - 1] == pytest.approx(0.05)
    assert np.all(np.diff(host[warm:]) <= 1e-15)  # never rises after the warm-up


def test_warmup_cosine_refuses_a_warmup_longer_than_the_run():
    with pytest.raises(ValueError, match="fewer warm-up epochs"):
        optim.warmup_cosine_schedule(0.1, total_steps=10, warmup_steps=11)


@pytest.mark.parametrize("epochs", [5, 3, 1])
def test_demo_schedule_follows_the_runs_epochs(epochs):
    """``--config.epochs=N``: the cosine ends with the run; the logged rate is the first
    update's of each epoch."""
    config = demo_config.get_config()
    for opt in (config.optimizer, config.teacher.recipe.optimizer):
        assert recipe.sgd_schedule(opt) == demo_config.SCHEDULE["schedule"]
    opt = config.optimizer
    if recipe.sgd_schedule(opt) != "cosine":
        pytest.skip("the demo's schedule is the step decay")
    warm = min(int(opt.warmup_epochs), epochs - 1) if epochs > 1 else 0
    opt.warmup_epochs = warm
    steps = 46
    schedule, _ = recipe.make_optimizer(opt, steps, epochs)
    total = epochs * steps
    rates = np.asarray(schedule(np.arange(total)))
    assert rates.max() == pytest.approx(opt.lr, rel=1e-6)
    assert rates[-1] < 0.01 * opt.lr  # decayed by the run's own last update
    log = recipe.lr_for_epoch(opt, epochs, steps)
    for epoch in range(1, epochs + 1):
        assert log(epoch) == pytest.approx(float(rates[(epoch - 1) * steps]), rel=1e-6)


def test_an_unknown_schedule_is_refused_with_the_field():
    config = demo_config.get_config()
    config.optimizer.schedule = "linear"
    with pytest.raises(ValueError, match="optimizer.schedule"):
        validate.check_config(config, devices=0)
    with pytest.raises(ValueError, match="step, cosine"):
        recipe.sgd_schedule(config.optimizer)


def _results(methods, seeds, teacher_epochs=4):
    def student(seed, top1):
        return {"seed": seed, "last_top1": top1, "best_top1": top1 + 1, "best_epoch": 2,
                "config": {"method": {}}}
    results = {"teacher": {"last_top1": 95.0, "best_top1": 95.0,
                           "config": {"epochs": teacher_epochs, "seed": 0}}}
    for i, m in enumerate(methods):
        results[m] = {"students": [student(s, 80.0 + i + s) for s in seeds]}
    return results


@pytest.mark.parametrize("epochs,seeds,train",
                         [(3, (0, 1), -1), (5, (0, 1, 2), 640), (1, (4,), -1)])
def test_footer_is_computed_from_the_run(epochs, seeds, train):
    config = demo_config.get_config()
    config.epochs = epochs
    config.train_examples = train
    results = _results(("kd", "kd_ls"), seeds, teacher_epochs=epochs + 1)
    text = suite_table.format_table(config, results)
    n_train = 1500 if train == -1 else train
    s = "s" if epochs != 1 else ""
    plural = "s" if len(seeds) != 1 else ""
    assert (f"{epochs} epoch{s} on {n_train:,} digits training images (297 test images), "
            f"{len(seeds)} seed{plural} per method") in text
    assert f"(resnet14, {epochs + 1} epochs, seed 0)" in text
    assert "5 epochs" not in text.replace(f"{epochs + 1} epochs", "") or epochs == 5
    for m in ("kd", "kd_ls"):
        (line,) = [ln for ln in text.splitlines() if ln.startswith(m + " ")]
        assert line.rstrip().endswith(str(len(seeds)))


def test_footer_says_validation_on_the_validation_split():
    config = demo_config.get_config("grid")
    config.sweep = "seed=0,1"
    text = suite_table.footer(config, _results(("kd",), (0, 1)), suite_table.method_rows(
        config, _results(("kd",), (0, 1))))
    assert "on 1,200 digits_val training images (300 validation images), 2 seeds" in text


def test_schedule_fields_have_help():
    from zkd_jax.configs import fields

    assert fields.help_for("optimizer.schedule")
    assert isinstance(demo_config.get_config().optimizer, ml_collections.ConfigDict)


def test_a_warmup_as_long_as_the_run_is_refused():
    config = demo_config.get_config()
    config.optimizer.schedule = "cosine"
    config.epochs = 2
    config.optimizer.warmup_epochs = 2
    with pytest.raises(ValueError, match="optimizer.warmup_epochs=2 is invalid.*fewer than"):
        validate.check_config(config, devices=0)

"""configs/cifar100_vit.py: the reference's recipes, and clear errors."""

from __future__ import annotations

import re

import pytest

from zkd_jax import methods, models, optim
from zkd_jax.configs import cifar100_vit


@pytest.mark.parametrize("student", cifar100_vit.STUDENTS)
def test_kd_ls_configs(student):
    c = cifar100_vit.get_config(f"kd_ls,resnet56,{student}")
    m = methods.from_config(c.method)
    assert isinstance(m, methods.ViTKD) and m.standardize and m.temperature == 2.0
    assert m.extra_weight == (10.0 if student == "deit_ti" else 9.0)
    assert m.kd_head == ("dist" if student == "deit_ti" else "cls")
    assert (c.batch_size, c.epochs, c.optimizer.name, c.optimizer.lr) == (128, 300, "adamw", 5e-4)
    assert c.paper.top1 == cifar100_vit.TOP1[student]["kd_ls"]
    models.create(student, num_classes=100, dataset=c.model_dataset)
    assert c.teacher.recipe.optimizer.nesterov and c.teacher.recipe.model_dataset == "cifar100"
    lr20 = optim.cosine_warmup_lr(20, base_lr=c.optimizer.lr, max_epoch=c.epochs,
                                  min_lr=c.optimizer.min_lr,
                                  warmup_epochs=c.optimizer.warmup_epochs,
                                  warmup_factor=c.optimizer.warmup_factor)
    assert abs(lr20 - 4.946e-4) < 1e-7  # the reference's warm-up + cosine


def test_base_and_teacher_configs():
    c = cifar100_vit.get_config("base,pit_ti")
    assert c.teacher.arch is None and methods.from_config(c.method).ce_weight == 1.0
    t = cifar100_vit.get_config("teacher,resnet56")
    assert t.student.arch == "resnet56" and t.optimizer.weight_decay == 5e-4


@pytest.mark.parametrize("arg", ["kd_ls,resnet32x4,deit_ti", "kd_ls,resnet56,vit_b", "dkd,deit_ti",
                                 "teacher,deit_ti"])
def test_bad_arguments(arg):
    with pytest.raises(ValueError):
        cifar100_vit.get_config(arg)


@pytest.mark.parametrize("field, value, message", [
    ("vit.train_transform", "rrc_flip_autoaug",
     "config.vit.train_transform='rrc_flip_autoaug' is not implemented"),
    ("vit.image_size", 100, "config.vit.image_size=100 is not a multiple of"),
    ("vit.eval_head", "cls", "config.vit.eval_head='cls': the trainer evaluates deit_ti's"),
    ("optimizer.name", "lamb", "config.optimizer.name='lamb' is invalid"),
])
def test_trainer_refuses_what_it_cannot_run_before_writing(tmp_path, field, value, message):
    from zkd_jax.configs import cifar100_vit
    from zkd_jax.trainer import train_and_evaluate

    config = cifar100_vit.get_config("kd_ls,resnet56,deit_ti")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()

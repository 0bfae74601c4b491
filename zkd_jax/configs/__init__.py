"""Benchmark configs (ml_collections). ``get_config(dataset_module_arg)`` lives in each module:

* ``zkd_jax.configs.cifar100.get_config("kd_ls,resnet32x4,resnet8x4")`` / ``("teacher,resnet32x4")``
* ``zkd_jax.configs.imagenet.get_config("kd_ls,ResNet34,ResNet18")``
* ``zkd_jax.configs.demo.get_config()``: the offline default of ``zkd-train`` (digits).

The paper's per-pair table is ``zkd_jax.configs.common.CIFAR100_PAIRS``.
"""

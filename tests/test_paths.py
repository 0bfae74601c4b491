"""zkd_jax.paths: user-given directories become absolute (orbax refuses relative ones)."""

from __future__ import annotations

import os

import jax
import numpy as np

from zkd_jax import models
from zkd_jax.io import torch_weights as convert
from zkd_jax.io import paths


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = paths.absolute("runs/a")
    assert os.fspath(got) == os.path.join(os.fspath(tmp_path), "runs", "a")
    assert os.fspath(paths.absolute(tmp_path / "b")) == os.fspath(tmp_path / "b")


def test_urls_are_kept():
    assert os.fspath(paths.absolute("gs://bucket/runs/a")) == "gs://bucket/runs/a"


def test_variables_round_trip_through_a_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = models.create("resnet8", num_classes=10)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
    )
    variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), variables)
    convert.save_variables("teachers/r8", variables, arch="resnet8", dataset="cifar100",
                           num_classes=10)
    loaded, meta = convert.load_variables("teachers/r8")
    assert meta["arch"] == "resnet8" and (tmp_path / "teachers" / "r8").is_dir()
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)

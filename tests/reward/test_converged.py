"""The converged full-softmax reference: trained once per dataset, scored row by row, never served stale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tree_search.data.planted import PlantedConfig
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.heads.reference import FullSoftmaxHead
from tree_search.heads.train import fit
from tree_search.reward.converged import ReferenceRecipe, cached_reference, train_reference

PLANTED = PlantedConfig(num_classes=40, dim=8, signal=3.0, num_train=3000, num_valid=800, num_test=900)


def _explicit_nll(head: FullSoftmaxHead, h: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's NLL from the weights, by an explicit log-sum-exp (not the head's own scoring)."""
    W = head.linear.weight.detach().double().numpy()
    b = head.linear.bias.detach().double().numpy()
    logits = np.asarray(h, dtype=np.float64) @ W.T + b
    top = logits.max(1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    return log_z - logits[np.arange(y.size), y]


def test_the_reference_is_trained_to_early_stopping_scored_per_row_and_cached_by_its_recipe(monkeypatch):
    dataset = load_env_dataset(TreeEnvConfig(dataset="planted", planted=PLANTED))
    recipe = ReferenceRecipe(epochs=3.0, min_steps=20, batch_size=256, patience=2)
    assert cached_reference(dataset, recipe, "cpu") is None  # nothing is trained by asking
    found = train_reference(dataset, recipe, device="cpu")
    # the same training again, scored independently from its weights
    torch.manual_seed(recipe.seed)
    head = FullSoftmaxHead(dataset.num_classes, dataset.dim)
    result = fit(head, dataset, recipe.train_config(dataset.labels["train"].shape[0]), device="cpu")
    expected = _explicit_nll(head, dataset.features["test"], np.asarray(dataset.labels["test"]))
    assert found.test_row_nll.shape == expected.shape
    np.testing.assert_allclose(found.test_row_nll, expected, rtol=1e-5, atol=1e-6)
    assert found.test_nll == pytest.approx(expected.mean(), rel=1e-6)
    valid = _explicit_nll(head, dataset.features["valid"], np.asarray(dataset.labels["valid"])).mean()
    assert found.valid_nll == pytest.approx(valid, rel=1e-5) == pytest.approx(result.best_valid_nll, rel=1e-5)
    assert found.epochs == pytest.approx(min(result.history, key=lambda p: p.valid_nll).epoch)
    # cached: served without training, the same numbers; another recipe or device is not served
    monkeypatch.setattr("tree_search.reward.converged.fit", lambda *a, **k: pytest.fail("trained again"))
    again = train_reference(dataset, recipe, device="cpu")
    assert np.array_equal(again.test_row_nll, found.test_row_nll) and again.valid_nll == found.valid_nll
    other = ReferenceRecipe(epochs=4.0, min_steps=20, batch_size=256, patience=2)
    assert cached_reference(dataset, other, "cpu") is None
    assert cached_reference(dataset, recipe, "cuda") is None

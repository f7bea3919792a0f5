"""The EK-FAC preconditioner is Kronfluence's: the same influence scores on the same model and data."""

from __future__ import annotations

import copy
import logging
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ddm_ops.config import DataParams, ModelParams, SubsetParams, TrainParams
from ddm_ops.curvature import _eigenbasis, fit_factors, from_state, log_odds, precondition, to_state
from ddm_ops.data import load_dataset
from ddm_ops.functional import per_sample_grads, split_state
from ddm_ops.models import build_model
from ddm_ops.objectives import margin
from ddm_ops.train import train

pytest.importorskip("kronfluence")


def _kronfluence_scores(model, train_set, test_set) -> np.ndarray:
    """Kronfluence's EK-FAC pairwise scores (N, M) in float64, empirical Fisher (the labels given)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Empirical(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return -margin(model(x), y).sum()

    f64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac",
        activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64,
        eigendecomposition_dtype=f64,
        lambda_dtype=f64,
        per_sample_gradient_dtype=f64,
    )
    score_args = ScoreArguments(score_dtype=f64, precondition_dtype=f64, per_sample_gradient_dtype=f64)
    net = prepare_model(copy.deepcopy(model).eval(), Empirical())
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer(
            "test", net, Empirical(), cpu=True, disable_tqdm=True, output_dir=folder, log_level=logging.WARNING
        )
        analyzer.fit_all_factors("f", train_set, per_device_batch_size=128, factor_args=factor_args)
        analyzer.compute_pairwise_scores(
            "s",
            "f",
            query_dataset=test_set,
            train_dataset=train_set,
            per_device_query_batch_size=64,
            per_device_train_batch_size=128,
            score_args=score_args,
        )
        return analyzer.load_pairwise_scores("s")["all_modules"].T.numpy()


def test_ekfac_influence_equals_kronfluence():
    ds = load_dataset(DataParams(subset=SubsetParams(train=300, test=40)))
    model = build_model(ModelParams(width=8), ds.image_shape, 10, 0)
    train(model, ds.x_train, ds.y_train, TrainParams(epochs=5), 0)
    model.eval()
    params, buffers = split_state(model, model.state_dict())
    x, y, xt, yt = ds.x_train, ds.y_train, ds.x_test, ds.y_test

    factors = from_state(to_state(fit_factors(model, params, buffers, x, seed=0, labels=y)))  # and back from disk
    loss_grads = per_sample_grads(model, params, buffers, x, y, lambda z, t: F.cross_entropy(z, t, reduction="none"))
    test_grads = per_sample_grads(model, params, buffers, xt, yt, lambda z, t: -margin(z, t))
    newton = precondition(factors, loss_grads, damping=1e-8)
    layers = ("features.0", "features.4", "classifier")  # the convolutions and the classifier; not the norms' affines
    assert sorted(newton) == sorted(f"{m}.{p}" for m in layers for p in ("weight", "bias"))
    ours = sum(newton[k].flatten(1).double() @ test_grads[k].flatten(1).double().T for k in newton).numpy()

    theirs = _kronfluence_scores(model, TensorDataset(x, y), TensorDataset(xt, yt))
    # measured: largest difference 4e-7 of the largest score, correlation 1 - 1e-13
    assert np.abs(ours - theirs).max() < 1e-5 * np.abs(theirs).max()
    assert (np.sign(ours) == np.sign(theirs)).mean() > 0.999


def test_precondition_inverts_the_fitted_curvature():
    """With a layer's own factors, preconditioning Q_S diag(λ) Q_A^T-shaped gradients divides by λ exactly."""
    ds = load_dataset(DataParams(subset=SubsetParams(train=100, test=10)))
    model = build_model(ModelParams(width=4), ds.image_shape, 10, 0).eval()
    params, buffers = split_state(model, model.state_dict())
    factors = fit_factors(model, params, buffers, ds.x_train, seed=0)
    head = factors[-1]
    assert head.weight == "classifier.weight" and head.bias == "classifier.bias"
    assert (head.lam >= 0).all() and head.lam.max() > 0
    i, j = divmod(int(head.lam.argmax()), head.lam.shape[1])
    lam = float(head.lam[i, j])
    e = torch.zeros_like(head.lam)
    e[i, j] = 1.0  # one eigen-direction of the Kronecker basis
    g = head.qs @ e @ head.qa.T
    grads = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    grads["classifier.weight"], grads["classifier.bias"] = g[:, :-1], g[:, -1]
    for damping in (1e-6 * lam, lam):  # damping as large as the eigenvalue halves the step
        out = precondition(factors, grads, damping=damping)
        got = torch.cat([out["classifier.weight"], out["classifier.bias"][:, None]], 1)
        torch.testing.assert_close(got, g / (lam + damping), rtol=1e-6, atol=1e-9 / lam)


def test_margin_curvature_is_the_gauss_newton_of_the_log_odds():
    """output margin: in each layer's Kronecker eigenbasis, the corrected eigenvalues are the mean squared per-sample
    gradients of the label's log-odds (TRAK's kernel, diagonal there), computed here independently with vmap."""
    ds = load_dataset(DataParams(subset=SubsetParams(train=200, test=10)))
    model = build_model(ModelParams(width=4), ds.image_shape, 10, 0).eval()
    params, buffers = split_state(model, model.state_dict())
    x, y = ds.x_train, ds.y_train
    factors = fit_factors(model, params, buffers, x, seed=0, labels=y, output="margin")
    grads = per_sample_grads(model, params, buffers, x, y, log_odds)
    assert len(factors) == 3
    for f in factors:
        rotated, lead = _eigenbasis(f, grads)
        assert lead == (len(x),)
        torch.testing.assert_close(f.lam, rotated.square().mean(0), rtol=1e-6, atol=1e-9 * float(f.lam.max()))

"""The peer libraries (dattri, Kronfluence) in this project's sign convention, on a case whose answer is known:
a test query that is a copy of a training sample must be helped by that sample, more than by almost any other, and
TracIn summed over a cluster is the first-order trajectory estimate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddm_ops import peers
from ddm_ops.baselines import first_order_scores
from ddm_ops.config import DataParams, ModelParams, SubsetParams, TrainParams
from ddm_ops.data import load_dataset
from ddm_ops.models import build_model
from ddm_ops.train import train
from ddm_ops.trajectory import Trajectory, cluster_gradients

pytest.importorskip("dattri", reason="the peers extra is not installed")
pytest.importorskip("kronfluence", reason="the peers extra is not installed")

TRAIN = TrainParams(epochs=6, batch_size=25, lr=0.1, checkpoint_every=2)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    ds = load_dataset(DataParams(subset=SubsetParams(train=600, test=30)))  # more than TRAK's 512 dimensions
    model = build_model(ModelParams(width=4, depth=2), ds.image_shape, 10, 0)
    checkpoints = []
    train(model, ds.x_train, ds.y_train, TRAIN, 0, on_checkpoint=checkpoints.append)
    copies = torch.arange(0, 600, 40)  # 15 test queries that are copies of training samples 0, 40, 80, ...
    test = (torch.cat([ds.x_test, ds.x_train[copies]]), torch.cat([ds.y_test, ds.y_train[copies]]))
    return ds, model.eval(), checkpoints, test, copies


def _scores(method: str, trained) -> np.ndarray:
    ds, model, checkpoints, test, _ = trained
    final, phases = checkpoints[-1].state, peers.Phases()
    data = (ds.x_train, ds.y_train)
    if method == "tracin":
        states = [c.state for c in checkpoints[:-1]]
        weights = [c.lr * c.epochs / TRAIN.batch_size for c in checkpoints[:-1]]
        out = peers.tracin(model, states, weights, data, test, "margin", phases)
    elif method == "influence":  # dattri's defaults: no damping
        out = peers.influence(model, final, data, test, "margin", phases)
    elif method == "trak":
        out = peers.trak(model, [final], data, test, "margin", phases)
    elif method == "trak_ensemble":
        out = peers.trak(model, [c.state for c in checkpoints[-3:]], data, test, "margin", phases)
    elif method == "ekfac":
        out = peers.ekfac(model, final, data, test, "margin", phases)
    else:
        out = peers.ekfac_ensemble(model, [c.state for c in checkpoints[-3:]], data, test, "margin", phases)
    assert out.shape == (600, 45) and np.isfinite(out).all()
    assert phases.seconds["online"] > 0
    return out


# Median rank of the copied sample among the 600 for its copy, measured (2026-12-02): tracin 3, influence 29,
# trak 1, trak_ensemble 1, ekfac 4, ekfac_ensemble 1; all 15 own scores positive for every method. Thresholds: twice the
# measurement, at least 10 (influence, Arnoldi without damping, is the weakest: top 10%).
MEDIAN_RANK = {"tracin": 10, "influence": 60, "trak": 10, "trak_ensemble": 10, "ekfac": 10, "ekfac_ensemble": 10}


@pytest.mark.parametrize("method", peers.PEERS)
def test_a_copied_training_sample_is_among_the_most_helpful_for_its_copy(trained, method):
    copies = trained[4].numpy()
    scores = _scores(method, trained)
    own = scores[copies, 30 + np.arange(len(copies))]
    assert (own > 0).mean() >= 0.9, own  # positive = helps: the sign convention
    ranks = (scores[:, 30:] >= own[None]).sum(0)  # 1 = the copied sample has the largest score of all 600
    print(method, "median rank", np.median(ranks))
    assert np.median(ranks) <= MEDIAN_RANK[method], ranks


def test_tracin_summed_over_a_cluster_is_the_first_order_estimate(trained):
    ds, model, checkpoints, test, _ = trained
    ids = np.arange(600) % 5  # any grouping of the training samples
    tracin = peers.per_cluster(_scores("tracin", trained), ids, 5)
    trajectory = Trajectory.from_checkpoints(model, checkpoints, TRAIN.batch_size)
    grads = [cluster_gradients(model, trajectory, ds.x_train[ids == k], ds.y_train[ids == k]) for k in range(5)]
    first_order = first_order_scores(model, trajectory, grads, *test, "margin")
    # dattri projects gradients to 512 random dimensions: equal up to the projection's noise (measured: correlation
    # 0.986, mean |score| ratio 1.014)
    assert np.corrcoef(tracin.ravel(), first_order.ravel())[0, 1] > 0.98
    np.testing.assert_allclose(np.abs(tracin).mean(), np.abs(first_order).mean(), rtol=0.1)

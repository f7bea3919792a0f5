"""Known-answer tests of the method's building blocks."""

import math

import numpy as np
import pytest
import torch

from ddm_ops.attribution import distances, scores
from ddm_ops.cluster import cluster_within_classes, nearest_members
from ddm_ops.config import DistillParams, ModelParams, TrainParams
from ddm_ops.curvature import damping_value, fit_factors
from ddm_ops.distill import matching_targets, solved_labels, whitener
from ddm_ops.functional import batched_grads
from ddm_ops.matching import gradient_distance, whitened_distance
from ddm_ops.models import build_model
from ddm_ops.objectives import margin
from ddm_ops.train import Checkpoint, DivergenceError, train
from ddm_ops.trajectory import Trajectory, checkpoint_gradients, cluster_gradients


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}


def test_gradient_distance_known_answers():
    a = _grads()
    assert gradient_distance(a, a).item() == pytest.approx(0.0, abs=1e-6)
    # a == -b: cosine distance 2 for every row of every layer, equal norms
    assert gradient_distance(a, {k: -v for k, v in a.items()}).item() == pytest.approx(4.0, abs=1e-5)
    # same directions, twice the norm: only the magnitude term, (ln 2)^2 per layer
    double = {k: 2 * v for k, v in a.items()}
    assert gradient_distance(double, a, magnitude_weight=1.0).item() == pytest.approx(2 * math.log(2) ** 2, rel=1e-5)
    assert gradient_distance(double, a, magnitude_weight=0.0).item() == pytest.approx(0.0, abs=1e-6)
    # orthogonal rows by hand: w rows e1 vs e2 -> cosine distance 1 per row; b equal
    w1 = torch.eye(3)[[0, 0]]
    w2 = torch.eye(3)[[1, 1]]
    assert gradient_distance({"w": w1}, {"w": w2}).item() == pytest.approx(1.0, abs=1e-6)
    # symmetric when norms agree
    b = _grads(1)
    b = {k: v / v.norm() * a[k].norm() for k, v in b.items()}
    assert gradient_distance(a, b).item() == pytest.approx(gradient_distance(b, a).item(), rel=1e-6)


def test_gradient_distance_batched_matches_loop():
    a = {k: torch.stack([v, 2 * v, -v]) for k, v in _grads().items()}
    b = {k: torch.stack([v, v, v]) for k, v in _grads().items()}
    batched = gradient_distance(a, b, batch_dims=1)
    single = [gradient_distance({k: v[i] for k, v in a.items()}, {k: v[i] for k, v in b.items()}) for i in range(3)]
    assert torch.allclose(batched, torch.stack(single), atol=1e-6)


def test_distances_by_hand():
    base = torch.log(torch.tensor([[0.5, 0.5]]))
    removed = torch.log(torch.tensor([[[0.8, 0.2]]]))
    d = distances(base, removed)
    l2 = math.sqrt(0.3**2 + 0.3**2)
    assert d["dist1"].item() == pytest.approx(100 * l2, rel=1e-5)
    assert d["dist2"].item() == pytest.approx(0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2), rel=1e-5)
    assert d["dist3"].item() == pytest.approx(1 / (1 + l2), rel=1e-5)
    same = distances(base, base[None])
    assert same["dist1"].item() == pytest.approx(0.0, abs=1e-5) and same["dist3"].item() == pytest.approx(1.0)


def test_margin_and_score_sign():
    logits = torch.tensor([[3.0, 1.0, 2.0]])
    assert margin(logits, torch.tensor([0])).item() == 1.0
    assert margin(logits, torch.tensor([1])).item() == -2.0
    worse = torch.tensor([[[1.0, 1.0, 2.0]]])  # removing the cluster lowers class 0's margin: it helped
    assert scores(logits, worse, torch.tensor([0])).item() == pytest.approx(2.0)


def test_clusters_stay_within_one_class():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    features = rng.normal(size=(60, 5)) + labels[:, None]
    ids, dist = cluster_within_classes(features, labels, 3, seed=0)
    assert sorted(np.unique(ids)) == list(range(9))
    for c in np.unique(ids):
        assert len(np.unique(labels[ids == c])) == 1 and labels[ids == c][0] == c // 3
    first = nearest_members(ids, dist, 4, 2)
    assert (ids[first] == 4).all() and dist[first[0]] <= dist[first[1]]
    with pytest.raises(ValueError, match="k_per_class = 21: class 0 has only 20"):
        cluster_within_classes(features, labels, 21, seed=0)


def test_matching_targets():
    x, y = _data(16)
    model, ckpts = _train(epochs=4, checkpoint_every=2)  # θ_0, θ_2, θ_4 = θ_T: two segments of 2 epochs
    traj = Trajectory.from_checkpoints(model, ckpts, 16)
    segments = cluster_gradients(model, traj, x, y)  # (2, ...): segment t starts at θ_t
    at = checkpoint_gradients(model, traj, torch.arange(3), x, y)  # (3, ...): every checkpoint
    k = "classifier.weight"
    torch.testing.assert_close(segments[k], 2.0 * at[k][:2])  # 2 epochs of the one-epoch share
    cases = {
        ("mirrored", "reverse"): ([2, 1], -segments[k][[0, 1]]),
        ("lifo", "reverse"): ([2, 1], -segments[k][[1, 0]]),
        ("mirrored", "forward"): ([0, 1], segments[k]),
        ("checkpoint", "reverse"): ([0, 2], -at[k][[0, 2]]),  # 2 checkpoints spread: θ_0 and θ_T
        ("checkpoint", "forward"): ([0, 2], at[k][[0, 2]]),
    }
    for (pairing, direction), (index, target) in cases.items():
        params = DistillParams(pairing=pairing, direction=direction, checkpoints=2)
        got_index, got = matching_targets(model, traj, x, y, params)
        assert got_index.tolist() == index, (pairing, direction)
        torch.testing.assert_close(got[k], target)


def test_solved_labels_are_the_least_squares_optimum():
    """The closed-form labels zero the whitened matching loss's gradient with respect to the labels (up to the
    ridge), and match the cluster's gradient better than one-hot labels on the same images."""
    x, y = _data(32)
    model, ckpts = _train()
    traj = Trajectory.from_checkpoints(model, ckpts, 16)
    members = (x[y == 1], y[y == 1])
    index, target = matching_targets(model, traj, *members, DistillParams(checkpoints=2))
    params, buffers = traj.at(index)
    curvature = []
    for t in range(len(index)):
        factors = fit_factors(model, {k: v[t] for k, v in params.items()}, {k: v[t] for k, v in buffers.items()}, x, 0)
        curvature.append((factors, damping_value(factors, 0.01)))
    whitened = whitener(curvature)
    images = members[0][:4]
    solved = solved_labels(model, (params, buffers), images, 3, whitened, whitened(target))

    def loss_and_grad(labels):
        labels = labels.clone().requires_grad_(True)
        loss = whitened_distance(whitened(batched_grads(model, params, buffers, images, labels)), whitened(target))
        loss.mean().backward()
        return loss.mean().item(), labels.grad.norm().item()

    loss, grad = loss_and_grad(solved)
    hard_loss, hard_grad = loss_and_grad(torch.nn.functional.one_hot(members[1][:4], 3).float())
    print(f"solved loss {loss:.4f} |grad| {grad:.2e}; one-hot loss {hard_loss:.4f} |grad| {hard_grad:.2e}")
    assert loss < 0.3 * hard_loss  # measured 0.399 against 3.05
    assert grad < 1e-3 * hard_grad  # measured 3e-5 of it (the ridge's pull)


def test_checkpoints_are_spread_over_the_trajectory():
    traj = Trajectory({}, {}, lrs=torch.full((15,), 0.05), epochs=torch.ones(15), batch_size=16)  # θ_0 … θ_15
    assert traj.spread(8).tolist() == [0, 2, 4, 6, 9, 11, 13, 15]
    assert traj.spread(4).tolist() == [0, 5, 10, 15]
    assert traj.spread(1).tolist() == [15]
    assert traj.spread(16).tolist() == traj.spread(40).tolist() == traj.spread("all").tolist() == list(range(16))


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(keep=None, seed=0, **kw):
    x, y = _data()
    model = build_model(ModelParams(width=4), (1, 8, 8), 3, seed)
    ckpts: list[Checkpoint] = []
    train(
        model,
        x,
        y,
        TrainParams(**{"epochs": 3, "batch_size": 16, "checkpoint_every": 1, **kw}),
        seed,
        keep=keep,
        on_checkpoint=ckpts.append,
    )
    return model, ckpts


def test_training_is_deterministic_and_checkpoints_the_trajectory():
    (a, ca), (b, _) = _train(), _train()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert [c.epoch for c in ca] == [0, 1, 2, 3] and [c.epochs for c in ca] == [1, 1, 1, 0]
    assert ca[-1].lr == 0.0 and ca[0].lr == 0.05 and ca[1].step == 4
    _, coarse = _train(checkpoint_every=2)
    assert [c.epoch for c in coarse] == [0, 2, 3] and [c.epochs for c in coarse] == [2, 1, 0]
    c, _ = _train(seed=1)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_aligned_training_with_all_kept_equals_full_training():
    full, _ = _train()
    kept, _ = _train(keep=torch.ones(64, dtype=torch.bool))
    assert torch.equal(full.classifier.weight, kept.classifier.weight)
    dropped, _ = _train(keep=torch.arange(64) >= 8)
    assert not torch.equal(full.classifier.weight, dropped.classifier.weight)


def test_divergence_names_the_step():
    with pytest.raises(DivergenceError, match=r"loss is (nan|inf) at step \d+ \(epoch \d+\)"):
        _train(lr=1e30)


def test_calibration_picks_the_closest_step_and_warns_at_the_grid_edge(caplog):
    """The removed logits move from θ_T's toward the truth and overshoot past step 1: step 1 is chosen, silently;
    when every removal moves away from the truth the smallest step wins, with a warning that says so."""
    from ddm_ops.calibration import calibrate_step

    start = torch.zeros(2, 5, 3)
    truth = torch.tensor([2.0, -1.0, 0.0]).expand(2, 5, 3)
    grid = (0.25, 0.5, 1.0, 2.0, 4.0)
    with caplog.at_level("WARNING", logger="ddm_ops.calibration"):
        step, curve = calibrate_step(lambda s: start + s * truth, truth, start[0], grid)
    assert step == 1.0 and [row["step_size"] for row in curve] == list(grid) and not caplog.records
    assert curve[2]["dist1"] == pytest.approx(0.0, abs=1e-6) and curve[0]["dist1"] > curve[1]["dist1"] > 0
    assert curve[0]["relative"] > curve[1]["relative"] > curve[2]["relative"] == pytest.approx(0.0, abs=1e-6)
    with caplog.at_level("WARNING", logger="ddm_ops.calibration"):
        step, _ = calibrate_step(lambda s: start - s * truth, truth, start[0], grid)
    assert step == 0.25
    assert "is the smallest of the grid 0.25 to 4" in caplog.text and "doing nothing" in caplog.text


def test_calibration_weighs_each_cluster_by_its_own_do_nothing_distance():
    """Cluster 0's removal reaches its retraining at step 1; cluster 1's (far from θ_T: do-nothing Dist1 77 against
    30) drifts sideways. Raw Dist1 summed over clusters prefers the smallest step, where cluster 1 has drifted least;
    relative to doing nothing, step 1 brings cluster 0 to its retraining (0x) while cluster 1 loses 1.5x: it wins."""
    from ddm_ops.calibration import calibrate_step, dist1_to

    base = torch.zeros(5, 3)
    truth = torch.stack([torch.tensor([1.0, 0.0, 0.0]).expand(5, 3), torch.tensor([0.0, 0.0, 4.0]).expand(5, 3)])
    sideways = torch.tensor([0.0, 2.0, 0.0]).expand(5, 3)
    grid = (0.25, 0.5, 1.0, 2.0, 4.0)
    step, curve = calibrate_step(lambda s: torch.stack([s * truth[0], s * sideways]), truth, base, grid)
    assert dist1_to(truth, base.expand_as(truth)).tolist() == pytest.approx([29.73, 77.32], abs=0.01)
    assert step == 1.0 and curve[2]["relative"] == pytest.approx(0.747, abs=1e-3)
    assert min(curve, key=lambda row: row["dist1"])["step_size"] == 0.25  # what the raw mean would have chosen


def test_group_lds_known_answers():
    from ddm_ops.metrics import group_lds

    masks = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1]])
    score = np.array([[1.0, -1.0], [2.0, 0.0], [4.0, 1.0]])
    exact = masks @ score  # an additive truth is ranked perfectly
    mean, per = group_lds(score, exact, masks)
    assert mean == pytest.approx(1.0) and per == pytest.approx([1.0, 1.0])
    mean, _ = group_lds(score, -exact, masks)
    assert mean == pytest.approx(-1.0)
    # by hand: predicted for test 0 = [1, 3, 7, 6] ranks [1, 2, 4, 3]; truth ranks [1, 2, 3, 4] -> rho = 0.8
    truth = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    _, per = group_lds(score, truth, masks)
    assert per[0] == pytest.approx(0.8)


def test_logo_spearman_known_answers():
    from ddm_ops.metrics import aggregate, logo_spearman, logo_spearman_within_class

    true = np.array([[0.1, 3.0], [0.2, 2.0], [0.3, 1.0]])
    mean, per = logo_spearman(true * 5, true)
    assert mean == pytest.approx(1.0)
    pred = np.array([[1.0, 1.0], [3.0, 2.0], [2.0, 3.0]])  # test 0: ranks [1,3,2] vs [1,2,3] -> 0.5; test 1: -1
    mean, per = logo_spearman(pred, true)
    assert per == pytest.approx([0.5, -1.0]) and mean == pytest.approx(-0.25)
    constant = np.ones((3, 2))
    assert np.isnan(logo_spearman(constant, true)[1]).all()
    groups = np.array([0, 0, 0, 1, 1, 1])
    tests = np.array([0, 1])
    big_true = np.vstack([true, true])
    big_pred = np.vstack([true, -true])
    assert logo_spearman_within_class(big_pred, big_true, groups, tests) == pytest.approx(0.0)  # +1 and -1
    assert aggregate(np.array([[1.0, 3.0, 5.0]]), np.array([0, 0, 1])).tolist() == [[2.0, 5.0]]


def test_models_built_from_threads_at_once_get_their_seeds_weights():
    """build_model seeds torch's process-wide generator: two threads at once must not mix their draws (found: 519 of
    800 builds wrong before the lock), and the caller's own generator state is left as it was."""
    from concurrent.futures import ThreadPoolExecutor

    params = ModelParams(width=32)
    seeds = list(range(40)) * 5
    serial = {s: build_model(params, (1, 8, 8), 10, s).state_dict() for s in set(seeds)}
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda s: (s, build_model(params, (1, 8, 8), 10, s).state_dict()), seeds))
    assert torch.rand(1) == expected_next
    wrong = sum(any(not torch.equal(v, serial[s][k]) for k, v in state.items()) for s, state in built)
    assert wrong == 0

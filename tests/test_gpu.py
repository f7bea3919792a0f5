"""On CUDA: training, distillation and removal keep every tensor on the GPU and agree with the CPU run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddm_ops.cluster import cluster_within_classes, nearest_members
from ddm_ops.config import DataParams, DistillParams, ModelParams, SubsetParams, TrainParams
from ddm_ops.data import load_dataset
from ddm_ops.devices import resolve_device
from ddm_ops.distill import distill_cluster
from ddm_ops.models import build_model
from ddm_ops.train import train
from ddm_ops.trajectory import Trajectory
from ddm_ops.unlearn import outputs_of, unlearn

pytestmark = pytest.mark.gpu


def _run(device: torch.device):
    ds = load_dataset(DataParams(subset=SubsetParams(train=200, test=60)))
    model = build_model(ModelParams(width=8), ds.image_shape, 10, 0).to(device)
    ckpts = []
    x, y = ds.x_train.to(device), ds.y_train.to(device)
    train(model, x, y, TrainParams(epochs=3, batch_size=32, lr=0.1, checkpoint_every=1), 0, on_checkpoint=ckpts.append)
    traj = Trajectory.from_checkpoints(model, ckpts, 32)
    assert all(v.device.type == device.type for v in traj.params.values())
    ids, dist = cluster_within_classes(ds.x_train.flatten(1).numpy(), ds.y_train.numpy(), 2, 0)
    members = np.flatnonzero(ids == 0)
    init = nearest_members(ids, dist, 0, 2)
    synset, losses = distill_cluster(
        model.eval(),
        traj,
        (x[members], y[members]),
        x[init],
        10,
        DistillParams(ipc=2, iterations=20, metric="layerwise"),
    )
    assert synset.images.device.type == device.type
    theta, buffers = traj.final()
    removed = unlearn(model, theta, buffers, synset.images[None], synset.labels[None], 3, 0.01)
    logits = outputs_of(model, removed, buffers, ds.x_test.to(device))
    assert logits.device.type == device.type
    return losses, logits.cpu()


def test_cuda_run_matches_the_cpu_run():
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would differ from the CPU by more than rounding
    cuda_losses, cuda_logits = _run(resolve_device("auto"))
    cpu_losses, cpu_logits = _run(torch.device("cpu"))
    assert resolve_device("auto").type == "cuda"
    np.testing.assert_allclose(cuda_losses, cpu_losses, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(cuda_logits, cpu_logits, rtol=1e-2, atol=1e-2)

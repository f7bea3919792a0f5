"""The one training loop (target, retraining, tests): seeded SGD with an optional trajectory of checkpoints."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ddm_ops.config import TrainParams
from ddm_ops.models import evaluating
from ddm_ops.objectives import summed_loss

log = logging.getLogger(__name__)


class DivergenceError(FloatingPointError):
    """The loss became NaN or infinite; the message names where."""


@dataclass(frozen=True)
class Checkpoint:
    """θ_t at the start of a trajectory segment, with the SGD that followed it (lr averaged over the segment)."""

    index: int
    epoch: int
    step: int
    lr: float
    epochs: int
    state: dict[str, torch.Tensor]


def lr_at(params: TrainParams, epoch: int) -> float:
    """Learning rate used during `epoch` (0-based)."""
    if params.lr_schedule == "cosine":
        return params.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / params.epochs))
    return params.lr


def batch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[list[torch.Tensor]]:
    """Per epoch, the index batches of a seeded shuffle; a function of (n, batch_size, seed) only."""
    g = torch.Generator().manual_seed(seed)
    return [list(torch.randperm(n, generator=g).split(batch_size)) for _ in range(epochs)]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Logits of the model in eval mode on x, `batch` images at a time (memory)."""
    with evaluating(model):
        return torch.cat([model(chunk) for chunk in x.split(batch)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x).argmax(-1) == y).float().mean().item()


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: TrainParams,
    seed: int,
    keep: torch.Tensor | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    label: str = "train",
    progress: bool = False,
) -> list[dict]:
    """Train `model` in place with SGD on (x, y); return one history row per epoch.

    Batches come from `batch_order(len(x), ...)`. With a boolean `keep` mask, samples that are not kept
    are dropped from their batch while the loss is still divided by the nominal batch size, so the run
    differs from the full-data run only by the removed samples' gradients (aligned retraining).
    `on_checkpoint` receives θ_t every `params.checkpoint_every` epochs, θ_0 first and θ_T last
    (the last one with lr 0 and no epochs after it). `progress` shows a bar of the epochs when stderr is a terminal.
    """

    opt = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    order = batch_order(len(x), params.batch_size, params.epochs, seed)
    history, step, saved = [], 0, 0
    keep = keep.to(x.device) if keep is not None else None

    def checkpoint(epoch: int, final: bool) -> None:
        nonlocal saved
        if on_checkpoint is None:
            return
        span = 0 if final else min(params.checkpoint_every, params.epochs - epoch)
        lr = sum(lr_at(params, e) for e in range(epoch, epoch + span)) / span if span else 0.0
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        on_checkpoint(Checkpoint(saved, epoch, step, lr, span, state))
        saved += 1

    model.train()
    bar = tqdm(total=params.epochs, desc=label, unit="epoch", disable=not (progress and sys.stderr.isatty()))
    for epoch in range(params.epochs):
        if epoch % params.checkpoint_every == 0:
            checkpoint(epoch, final=False)
        lr = lr_at(params, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        losses, count, first = [], 0, step  # batch losses stay on the device: no host sync per step
        for batch in order[epoch]:
            batch = batch.to(x.device)
            nominal = len(batch)
            if keep is not None:
                batch = batch[keep[batch]]
            opt.zero_grad(set_to_none=False)
            if len(batch):
                loss = summed_loss(model(x[batch]), y[batch]) / nominal
                loss.backward()
                losses.append(loss.detach() * nominal)
                count += len(batch)
            else:
                losses.append(torch.zeros((), device=x.device))
            opt.step()
            step += 1
        summed = torch.stack(losses)
        if not torch.isfinite(summed).all():  # the first bad step: every update after it is NaN too
            bad = int(torch.nonzero(~torch.isfinite(summed))[0])
            raise DivergenceError(f"{label}: loss is {summed[bad].item()} at step {first + bad} (epoch {epoch})")
        row = {"epoch": epoch, "step": step, "lr": lr, "loss": summed.sum().item() / max(count, 1)}
        if test is not None:
            row["test_accuracy"] = accuracy(model, *test)
        history.append(row)
        bar.update()
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("loss", "test_accuracy")})
        log.log(  # the target's epochs; a fan-out's retrainings only at debug level (their bar is per task)
            logging.INFO if progress else logging.DEBUG,
            "%s epoch %d/%d loss %.4f%s",
            label,
            epoch + 1,
            params.epochs,
            row["loss"],
            f" test acc {row['test_accuracy']:.3f}" if test is not None else "",
        )
    bar.close()
    checkpoint(params.epochs, final=True)
    return history

"""Curvature of the training loss as EK-FAC factors, and the Newton (influence-function) step they give a gradient.

EK-FAC (George et al. 2018; Grosse et al. 2023, as in Kronfluence): per Linear / Conv2d layer, a Gauss–Newton
matrix of the training loss is approximated in the Kronecker eigenbasis Q_S ⊗ Q_A of the layer's output-gradient
covariance S and input covariance A (the bias as a last input column of ones), with the eigenvalues corrected to the
mean squared per-sample gradient in that basis. Of which per-sample output: the loss with labels sampled from the
model (the true Fisher, as Kronfluence), or the log-odds of the true class (TRAK's kernel, Park et al. 2023: not
weighted down where the model is confident). Layers of other kinds (normalisation affines) are not tracked: a
preconditioned step leaves them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ddm_ops.functional import Weights, math_attention
from ddm_ops.trajectory import Trajectory

KINDS = ("fisher", "margin")  # the curvature_factors kinds (perturb.curvature)

BATCH = 256  # training images per pass
PER_SAMPLE_ENTRIES = 1 << 24  # per-sample gradient entries held at once (a ResNet18 layer's 256 took 4.8 GB)


def log_odds(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of the true class under the softmax, per sample: a soft margin (TRAK's output function).
    Kept out of objectives.py, whose bytes key every cached retraining (stages/retraining.py)."""
    correct = logits.gather(-1, labels[..., None])[..., 0]
    return correct - logits.scatter(-1, labels[..., None], float("-inf")).logsumexp(-1)


@dataclass(frozen=True)
class LayerFactors:
    """One layer's EK-FAC factors: input eigenvectors qa (d_in, d_in), output-gradient eigenvectors qs (d_out, d_out)
    and corrected eigenvalues lam (d_out, d_in) of the Fisher of the mean loss; d_in counts the bias column."""

    weight: str
    bias: str | None
    shape: tuple[int, ...]
    qa: torch.Tensor
    qs: torch.Tensor
    lam: torch.Tensor

    def to(self, device: torch.device) -> LayerFactors:
        return LayerFactors(
            self.weight, self.bias, self.shape, self.qa.to(device), self.qs.to(device), self.lam.to(device)
        )


Factors = list[LayerFactors]


def tracked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear and (ungrouped) Conv2d layers the curvature can cover, by module name (those whose forward runs:
    attention's output projection, whose weight is read directly, is left out when fitting)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    ]


def _inputs(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """A layer's input as (batch, tokens, d_in): im2col patches for convolutions, a column of ones for the bias."""
    if isinstance(module, nn.Conv2d):
        a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    else:
        a = a.reshape(len(a), -1, a.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
    return a


def _output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """The gradient at a layer's output as (batch, tokens, d_out)."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(len(g), -1, g.shape[-1])


def _layer_passes(
    model: nn.Module,
    params: Weights,
    buffers: Weights,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    seed: int,
    output: str = "loss",
):
    """Per batch of x: for each tracked layer, its inputs (b, tokens, d_in) and output gradients (b, tokens, d_out)
    of the summed loss with the given labels, or with labels sampled from the model (the true Fisher); or, output
    "margin", of the summed log-odds of the given labels."""
    layers = tracked_layers(model)
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    generator = torch.Generator().manual_seed(seed)
    for i, xb in enumerate(x.split(BATCH)):
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [
            m.register_forward_hook(
                lambda mod, inp, out, name=name, seen=captured: seen.__setitem__(name, (inp[0], out))
            )
            for name, m in layers
        ]
        try:
            with math_attention():
                logits = functional_call(model, (p, buffers), (xb,))
        finally:
            for h in hooks:
                h.remove()
        if labels is None:
            probs = logits.detach().double().softmax(-1).cpu()
            targets = torch.multinomial(probs, 1, generator=generator).flatten().to(x.device)
        else:
            targets = labels[i * BATCH : (i + 1) * BATCH]
        if output == "margin":
            loss = log_odds(logits, targets).sum()
        else:
            loss = F.cross_entropy(logits, targets, reduction="sum")
        used = [(name, m) for name, m in layers if name in captured]  # not those whose weights are read directly
        outs = torch.autograd.grad(loss, [captured[name][1] for name, _ in used])
        yield {
            name: (_inputs(m, captured[name][0].detach()).double(), _output_grads(m, g.detach()).double())
            for (name, m), g in zip(used, outs)
        }


def fit_factors(
    model: nn.Module,
    params: Weights,
    buffers: Weights,
    x: torch.Tensor,
    seed: int,
    labels: torch.Tensor | None = None,
    output: str = "loss",
) -> Factors:
    """EK-FAC factors of the mean cross-entropy on the training images x at the weights (params, buffers): the true
    Fisher with labels drawn from the model (seeded), or with `labels` the empirical Fisher; with output "margin"
    (and `labels`), of the Gauss–Newton matrix of the labels' log-odds, mean over x of ∇f_n ∇f_n^T.

    Two passes over x: the covariances A and S and their eigenvectors, then the eigenvalue correction
    lam = mean over samples of (Q_S^T G_n Q_A)^2, G_n the sample's gradient (d_out, d_in). float64 throughout.
    """
    modules = dict(tracked_layers(model))
    cov: dict[str, list[torch.Tensor]] = {}
    for batch in _layer_passes(model, params, buffers, x, labels, seed, output):
        for name, (a, g) in batch.items():
            a, g = a.flatten(0, 1), g.flatten(0, 1)
            if name not in cov:
                cov[name] = [a.T @ a, g.T @ g]
            else:
                cov[name][0] += a.T @ a
                cov[name][1] += g.T @ g
    bases = {name: (_eigenvectors(a), _eigenvectors(s)) for name, (a, s) in cov.items()}
    lam: dict[str, torch.Tensor] = {}
    for batch in _layer_passes(model, params, buffers, x, labels, seed, output):
        for name, (a, g) in batch.items():
            qa, qs = bases[name]
            a, g = a @ qa, g @ qs  # Q_S^T G_n Q_A = Σ_tokens (Q_S^T g)(Q_A^T a)^T
            step = max(1, PER_SAMPLE_ENTRIES // (g.shape[-1] * a.shape[-1]))  # samples whose G_n are held at once
            for i in range(0, len(a), step):
                rotated = torch.einsum("bto,bti->boi", g[i : i + step], a[i : i + step]).square().sum(0)
                lam[name] = lam[name] + rotated if name in lam else rotated
    return [
        LayerFactors(
            f"{name}.weight",
            f"{name}.bias" if modules[name].bias is not None else None,
            tuple(modules[name].weight.shape),
            bases[name][0],
            bases[name][1],
            lam[name] / len(x),
        )
        for name in cov
    ]


def _eigenvectors(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric covariance; LAPACK's eigh can fail on an ill-conditioned one (a ResNet's wide
    layers on few images), and then a tiny multiple of the mean diagonal is added, which leaves the basis."""
    try:
        return torch.linalg.eigh(cov)[1]
    except torch.linalg.LinAlgError:
        jitter = 1e-10 * cov.diagonal().mean().clamp_min(1e-30)
        return torch.linalg.eigh(cov + jitter * torch.eye(len(cov), dtype=cov.dtype, device=cov.device))[1]


def damping_value(factors: Factors, damping: float) -> float:
    """The damping added to every eigenvalue: `damping` times the mean eigenvalue over the layers (0.1 is
    Kronfluence's heuristic when its damping is None), so that one setting fits any model and loss scale."""
    return damping * float(torch.cat([f.lam.flatten() for f in factors]).mean())


Curvature = list[tuple[Factors, float]]  # (EK-FAC factors, absolute damping) at each checkpoint


def uses_curvature(update: str, metric: str) -> bool:
    """Whether the EK-FAC curvature is fitted: the Newton removal (perturb.update ekfac) or the whitened matching
    (distill.metric whitened) needs it."""
    return update == "ekfac" or metric == "whitened"


def lengthened(update: str, curvature: str, lengths: str) -> bool:
    """Whether the removal's Fisher Newton steps are lengthened to TRAK's kernel's (perturb.lengths kernel), which
    needs the kernel's factors too; a removal by the kernel itself (curvature margin) has its lengths already."""
    return update == "ekfac" and curvature == "fisher" and lengths == "kernel"


def damped(factors: list[Factors], damping: float, device: torch.device) -> Curvature:
    """Each checkpoint's factors on `device` with their absolute damping (damping_value of the relative `damping`)."""
    out = []
    for layers in factors:
        layers = [f.to(device) for f in layers]
        out.append((layers, damping_value(layers, damping)))
    return out


def _eigenbasis(f: LayerFactors, grads: Weights) -> tuple[torch.Tensor, torch.Size]:
    """A layer's gradient (weight and bias as one (d_out, d_in) matrix, leading batch dims kept) in its EK-FAC
    eigenbasis, Q_S^T G Q_A in float64; and the leading dims."""
    w = grads[f.weight]
    lead = w.shape[: w.dim() - len(f.shape)]
    m = w.reshape(*lead, f.shape[0], -1).double()
    if f.bias is not None:
        m = torch.cat([m, grads[f.bias].double()[..., None]], -1)
    return f.qs.T @ m @ f.qa, lead


def precondition(factors: Factors, grads: Weights, damping: float) -> Weights:
    """(F + damping)^-1 g for the tracked layers' weights and biases; grads may carry leading batch dims.

    Returns only the tracked parameters (the step leaves the others unchanged), in the dtype of `grads`.
    """
    out: Weights = {}
    for f in factors:
        v, _ = _eigenbasis(f, grads)
        w = grads[f.weight]
        m = (f.qs @ (v / (f.lam + damping)) @ f.qa.T).to(w.dtype)
        if f.bias is not None:
            out[f.bias] = m[..., -1]
            m = m[..., :-1]
        out[f.weight] = m.reshape(w.shape)
    return out


def whiten(factors: Factors, grads: Weights, damping: float) -> torch.Tensor:
    """(F + damping)^-1/2 g in the eigenbasis, the tracked layers flattened into one vector per leading index:
    inner products of whitened gradients are those the Newton step's scores are made of, ⟨∇o, (F + damping)^-1 g⟩
    = ⟨W∇o, Wg⟩, so a gradient error measured here bounds the error it causes in every score."""
    parts = []
    for f in factors:
        v, lead = _eigenbasis(f, grads)
        parts.append((v / (f.lam + damping).sqrt()).flatten(len(lead)))
    return torch.cat(parts, -1)


def to_state(factors: Factors) -> dict:
    """A dict of tensors and strings that torch.load(weights_only=True) reads back (from_state)."""
    return {
        "layers": [
            {"weight": f.weight, "bias": f.bias or "", "shape": list(f.shape), "qa": f.qa, "qs": f.qs, "lam": f.lam}
            for f in factors
        ]
    }


def from_state(state: dict) -> Factors:
    return [
        LayerFactors(d["weight"], d["bias"] or None, tuple(d["shape"]), d["qa"], d["qs"], d["lam"])
        for d in state["layers"]
    ]


def stored_factors(state: dict, key: str = "factors") -> tuple[torch.Tensor, list[Factors]] | None:
    """The curvature stage's factors.pt ({"checkpoints", "factors" and "kernel": to_state() at each}) as (checkpoint
    indices, the `key` factors at each: the removal's curvature, or TRAK's kernel for perturb.lengths kernel); None
    when it holds none."""
    found = state.get(key) or []
    return (state["checkpoints"], [from_state(f) for f in found]) if found else None


def curvature_factors(
    model: nn.Module,
    trajectory: Trajectory,
    train: tuple[torch.Tensor, torch.Tensor],
    checkpoints: int | str,
    seed: int,
    kind: str = "fisher",
) -> tuple[torch.Tensor, list[Factors]]:
    """EK-FAC factors over the training images and labels `train` at `checkpoints` checkpoints spread over the
    trajectory (Trajectory.spread): (their indices, the factors at each). kind fisher: the true Fisher of the loss;
    margin: the Gauss–Newton matrix of the labels' log-odds (fit_factors)."""
    if kind not in KINDS:
        raise ValueError(f"curvature kind {kind!r}: expected one of {', '.join(KINDS)}")
    x, y = train
    labels, output = (y, "margin") if kind == "margin" else (None, "loss")
    index = trajectory.spread(checkpoints)
    factors = []
    for i in index.tolist():
        theta, buffers = trajectory.at(i)
        factors.append(fit_factors(model, theta, buffers, x, seed=seed * 1_009 + i, labels=labels, output=output))
    return index, factors

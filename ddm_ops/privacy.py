"""What a synset reveals of the training images: its nearest real images (L2 and SSIM), PSNR and SSIM to them,
distances to members against non-members, and a likelihood-ratio membership attack on a model trained from it.

Images are in the [0, 1] pixel range, (N, C, H, W).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_curve

from ddm_ops.curvature import log_odds

SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # SSIM's constants for a data range of 1


def _window(side: int) -> torch.Tensor:
    """SSIM's 1-D window as scikit-image's structural_similarity weighs it: Gaussian of sigma 1.5 over 11 pixels
    (Wang et al. 2004, `gaussian_weights=True`) when the image is that large, else uniform over 7 pixels (its
    default window), or over the image's largest odd size below that."""
    if side >= 11:
        x = torch.arange(11, dtype=torch.float64) - 5
        g = torch.exp(-(x**2) / (2 * 1.5**2))
        return g / g.sum()
    size = min(7, side - (1 - side % 2))
    return torch.full((size,), 1 / size, dtype=torch.float64)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The Gaussian-weighted mean of every valid window of x (..., H, W). The 2-D window is g ⊗ g, so rows then
    columns: 2 × size shifted sums instead of a size² convolution, which torch runs slowly in float64 (4-5x
    faster, same values, measured on 28x28 and 32x32 images)."""
    s, (h, w) = len(g), x.shape[-2:]
    rows = sum(g[i] * x[..., i : h - s + 1 + i, :] for i in range(s))
    return sum(g[j] * rows[..., j : w - s + 1 + j] for j in range(s))


def ssim(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Structural similarity of every pair: a (n, C, H, W) against b (m, C, H, W) -> (n, m), pixels in [0, 1].

    Wang et al. 2004 as scikit-image computes it (data_range 1, population covariances): the window of `_window`
    over every position where it fits, the mean over positions and channels.
    """
    a, b = a.double(), b.double()  # variances are differences of near-equal sums
    g = _window(min(a.shape[2:])).to(a.device)
    out = torch.empty(len(a), len(b), dtype=torch.float64)
    mb = _blur(b, g)
    vb = _blur(b * b, g) - mb**2
    for i in range(len(a)):
        x = a[i : i + 1]
        mx = _blur(x, g)
        vx = _blur(x * x, g) - mx**2
        for j in range(0, len(b), chunk):
            y, my, vy = b[j : j + chunk], mb[j : j + chunk], vb[j : j + chunk]
            cov = _blur(x * y, g) - mx * my
            s = ((2 * mx * my + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mx**2 + my**2 + SSIM_C1) * (vx + vy + SSIM_C2))
            out[i, j : j + chunk] = s.flatten(1).mean(1)
    return out.float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio (dB) of paired images (n, C, H, W); higher = more alike."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double())


def nearest_real(images: torch.Tensor, members: torch.Tensor, non_members: torch.Tensor) -> dict[str, np.ndarray]:
    """For every image: its nearest member (training image) by L2, the PSNR and SSIM to it, the highest SSIM to any
    member, and the distance to the nearest member over that to the nearest non-member (held-out image): about 1
    when the image says nothing about the training set, near 0 when it copies a training image."""
    d_members = _l2(images, members)
    l2, index = d_members.min(1)
    to_non_members = _l2(images, non_members).min(1).values
    similarity = ssim(images, members)
    nearest = members[index]
    return {
        "nearest_index": index.numpy(),
        "l2": l2.numpy(),
        "psnr": psnr(images, nearest).numpy(),
        "ssim": similarity[torch.arange(len(images)), index].numpy(),
        "max_ssim": similarity.max(1).values.numpy(),
        "distance_ratio": (l2 / to_non_members.clamp_min(1e-12)).numpy(),
    }


def confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The attack's statistic per image: log p_y - log(1 - p_y) of its own label y, from logits (n, C); a model is
    more confident on the images it was trained on."""
    return log_odds(logits.double(), labels).numpy()


def likelihood_ratio(target: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Offline likelihood-ratio attack with a fixed variance (Carlini et al. 2022, "Membership inference attacks
    from first principles"): per image, how far the target model's confidence lies above the mean confidence of
    reference models that never saw the image, in units of their spread. target (n,), references (R, n), R >= 2.
    The per-image reference mean removes how easy each image is, which a plain loss threshold confuses with
    membership."""
    return (target - references.mean(0)) / references.std(0, ddof=1).mean()


def auc(scores: np.ndarray, member: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of scores (..., n) against the boolean member (..., n), ties counted half (equal to
    scikit-learn's roc_auc_score), from ranks: vectorised over rows, for the bootstrap's thousand resamples."""
    ranks = rankdata(scores, axis=-1)
    n_pos = member.sum(-1)
    n_neg = member.shape[-1] - n_pos
    return ((ranks * member).sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def attack_quality(scores: np.ndarray, member: np.ndarray, seed: int, resamples: int = 1000) -> dict[str, float]:
    """AUC of scores (higher = called a member) with a 95% bootstrap interval, and the true-positive rate at 1%
    false positives (the low-error regime a real attack needs)."""
    fpr, tpr, _ = roc_curve(member, scores)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(member), np.flatnonzero(~member)
    idx = np.stack([np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(resamples)])
    low, high = np.quantile(auc(scores[idx], member[idx]), [0.025, 0.975])
    return {
        "auc": float(auc(scores, member)),
        "auc_low": float(low),
        "auc_high": float(high),
        "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
    }

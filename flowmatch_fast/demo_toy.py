"""The demo's toy problem: 2-D data, a small MLP velocity field, two distances between point
clouds, and the figure. Used by :mod:`flowmatch_fast.demo`."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

DATASETS = ("moons", "ring")
MMD_BANDWIDTHS = (0.1, 0.25, 0.5, 1.0)  # data units; the toys are O(1) in scale
NUM_PROJECTIONS = 1024


# ---------------------------------------------------------------------------------- toy data
def toy_data(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points of a 2-D toy distribution, roughly zero-mean and unit-scale, float32 on CPU."""
    if name == "moons":
        # Two interleaving half circles (as sklearn's make_moons), plus a little Gaussian noise.
        n_upper = n // 2
        angle = torch.rand(n, generator=generator) * math.pi
        upper = torch.arange(n) < n_upper
        x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
        y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
        pts = torch.stack([x, y], dim=1) + 0.06 * torch.randn(n, 2, generator=generator)
        pts = (pts - torch.tensor([0.5, 0.25])) * torch.tensor([1.0 / 0.87, 1.0 / 0.5])
        return pts[torch.randperm(n, generator=generator)]
    if name == "ring":
        # 8 Gaussians evenly spaced on a circle of radius 2.
        k = torch.randint(0, 8, (n,), generator=generator).float()
        centers = 2.0 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1)
        return centers + 0.15 * torch.randn(n, 2, generator=generator)
    raise ValueError(f"dataset must be one of {DATASETS}; got {name!r}")


# ---------------------------------------------------------------------------------- the field
class VelocityMLP(nn.Module):
    """``v(x, t)``: an MLP on the concatenation ``[x, t]`` (3 inputs), SiLU, 2 outputs."""

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3):
        super().__init__()
        mods, width = [], dim + 1
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        mods.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # t arrives as [B, 1] (an expanded view of one time); broadcast a [1, 1] or 0-dim t too.
        t = t.reshape(-1, 1).to(x.dtype).expand(x.shape[0], 1)
        return self.net(torch.cat([x, t], dim=1))


# ---------------------------------------------------------------------------------- the metric
def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, num_projections: int = NUM_PROJECTIONS, seed: int = 0
) -> float:
    """Sliced Wasserstein-1 distance between two equal-size point clouds ``[N, D]``.

    Both clouds are projected on ``num_projections`` random unit directions (a fixed seed, so every
    call uses the same directions); in 1-D the W1 distance between two empirical distributions of
    equal size is the mean absolute difference of their sorted values. Returns the mean over the
    directions. Computed in float64 on CPU.
    """
    a = a.detach().to("cpu", torch.float64).reshape(a.shape[0], -1)
    b = b.detach().to("cpu", torch.float64).reshape(b.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"need equal-size clouds, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(num_projections, a.shape[1], generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    # [P, N], contiguous along the samples: sorting the last dim is much faster than dim 0.
    pa = (dirs @ a.T).contiguous().sort(dim=1).values
    pb = (dirs @ b.T).contiguous().sort(dim=1).values
    return (pa - pb).abs().mean().item()


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, bandwidths=MMD_BANDWIDTHS, chunk: int = 1024) -> float:
    """Maximum mean discrepancy between two point clouds ``[N, D]``, ``[M, D]``, RBF kernel.

    The kernel is the mean of Gaussian kernels ``exp(-|x - y|^2 / (2 s^2))`` over ``bandwidths``
    (several scales, so that both the placement of the modes and their sharpness count). Returns
    ``sqrt(max(MMD^2, 0))`` with the biased (V-statistic) estimate of ``MMD^2``, so two finite
    draws of the same distribution score a small positive number (the finite-sample floor).
    Computed on CPU in row chunks (float32 kernels, float64 sums).
    """
    a = a.detach().to("cpu", torch.float32).reshape(a.shape[0], -1)
    b = b.detach().to("cpu", torch.float32).reshape(b.shape[0], -1)
    scales = [-1.0 / (2.0 * s * s) for s in bandwidths]

    def kernel_mean(x, y):
        total = 0.0
        y2 = y.square().sum(1)
        for i in range(0, x.shape[0], chunk):
            xi = x[i:i + chunk]
            # |x|^2 + |y|^2 - 2 x.y  (clamped: rounding can make it slightly negative)
            d2 = (xi.square().sum(1, keepdim=True) + y2).addmm_(xi, y.T, alpha=-2.0).clamp_min_(0)
            buf = torch.empty_like(d2)
            for c in scales:
                # exp(-80) ~ 2e-35 is 0 here; clamping avoids exp's slow underflow path.
                torch.mul(d2, c, out=buf).clamp_min_(-80.0).exp_()
                total += buf.sum(1).double().sum().item()  # row sums in float32, then float64
        return total / (x.shape[0] * y.shape[0] * len(scales))

    mmd2 = kernel_mean(a, a) + kernel_mean(b, b) - 2.0 * kernel_mean(a, b)
    return math.sqrt(max(mmd2, 0.0))


# ---------------------------------------------------------------------------------- the plot
def plot_demo(path: str, heldout, samples, traj, noise_metric, sample_metric, title: str) -> str:
    """Three panels: held-out data, samples, trajectories (noise -> data). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    heldout, samples, traj = heldout.cpu(), samples.cpu(), traj.cpu()
    shown = torch.cat([heldout, samples, traj.reshape(-1, traj.shape[-1])])
    lim = max(float(shown.abs().max()) * 1.05, 3.0)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), dpi=100)
    axes[0].scatter(heldout[:, 0], heldout[:, 1], s=3, alpha=0.5, c="tab:blue")
    axes[0].set_title(f"held-out data (n={len(heldout)})")
    axes[1].scatter(samples[:, 0], samples[:, 1], s=3, alpha=0.5, c="tab:orange")
    axes[1].set_title(
        f"FlowMatching.sample (n={len(samples)})\n"
        f"MMD to data: {sample_metric:.3f}  (noise: {noise_metric:.3f})"
    )
    ax = axes[2]
    ax.scatter(heldout[:, 0], heldout[:, 1], s=2, alpha=0.12, c="tab:blue", label="data")
    for k in range(traj.shape[0]):
        ax.plot(traj[k, :, 0], traj[k, :, 1], "-", lw=0.9, alpha=0.8, c="0.3")
    ax.scatter(traj[:, 0, 0], traj[:, 0, 1], s=14, c="k", marker="o", label="noise (t=0)", zorder=3)
    ax.scatter(traj[:, -1, 0], traj[:, -1, 1], s=22, c="tab:red", marker="*",
               label="sample (t=1)", zorder=3)
    ax.set_title(f"{traj.shape[0]} trajectories, {traj.shape[1] - 1} Euler steps")
    ax.legend(loc="lower right", fontsize=8, markerscale=1.5)
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.grid(alpha=0.25)
    fig.suptitle(title, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return os.path.abspath(path)

"""Classifier-free-guidance math: rescaling, renormalisation, projections, damping.

Every statistic is per sample: tensors are [B, ...] (``[B, C, H, W]`` images,
``[B, C, T, H, W]`` video) and reductions run over every dimension but the batch, so
one item of a batch never changes another. Reductions that are sensitive to
cancellation run in float64 and the result is cast back to the input dtype. All
functions are finite on zero and constant inputs.
"""

from __future__ import annotations

from typing import Tuple

import torch

EPS = 1e-12


def sample_dims(x: torch.Tensor) -> Tuple[int, ...]:
    """Every dimension but the batch."""
    return tuple(range(1, x.ndim))


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] tensor to broadcast against ``like`` [B, ...]."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain classifier-free guidance ``uncond + scale * (cond - uncond)`` (Ho & Salimans 2022)."""
    return uncond + (cond - uncond) * scale


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, 1 where ``den`` is 0 (nothing to rescale)."""
    return torch.where(den > EPS, num / den.clamp_min(EPS), torch.ones_like(num))


# --- rescaling and renormalisation ------------------------------------------------

def rescale(guided: torch.Tensor, cond: torch.Tensor, multiplier: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, arXiv 2305.08891, eq. 15-16).

    ``out = m * guided * std(cond) / std(guided) + (1 - m) * guided``, standard
    deviations per sample. guided, cond [B, ...] in the model's v-space.
    """
    ratio = safe_ratio(cond.std(dim=sample_dims(cond), keepdim=True),
                       guided.std(dim=sample_dims(guided), keepdim=True))
    return multiplier * guided * ratio + (1.0 - multiplier) * guided


def renorm(guided: torch.Tensor, cond: torch.Tensor, renorm_cfg: float) -> torch.Tensor:
    """CFG renormalisation (Lumina-Image 2.0, arXiv 2503.21758).

    Caps the L2 norm of ``guided`` at ``renorm_cfg * ||cond||`` per sample; ``renorm_cfg
    <= 0`` disables the cap. guided, cond [B, ...].
    """
    if renorm_cfg <= 0:
        return guided
    dims = sample_dims(guided)
    limit = torch.linalg.vector_norm(cond.double(), dim=dims, keepdim=True) * renorm_cfg
    norm = torch.linalg.vector_norm(guided.double(), dim=dims, keepdim=True)
    scale = torch.where(norm >= limit, limit / norm.clamp_min(EPS), torch.ones_like(norm))
    return guided * scale.to(guided.dtype)


def channel_norm_scale(guided: torch.Tensor, cond: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CFGNorm's per-pixel factor ``clamp(||cond||_c / (||guided||_c + eps), 0, 1)``.

    Norms over the channel dimension (dim 1). Returns [B, 1, ...].
    """
    cond_norm = torch.norm(cond, dim=1, keepdim=True)
    guided_norm = torch.norm(guided, dim=1, keepdim=True)
    return (cond_norm / (guided_norm + eps)).clamp(min=0.0, max=1.0)


# --- adaptive projected guidance ------------------------------------------------------

def project(v: torch.Tensor, onto: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split ``v`` into parts parallel and orthogonal to ``onto``, per sample, in float64.

    v, onto [B, ...] -> (parallel, orthogonal), both of v's shape and dtype. A zero
    ``onto`` has no direction: everything is orthogonal.
    """
    dims = sample_dims(v)
    v64, onto64 = v.double(), onto.double()
    unit = onto64 / torch.linalg.vector_norm(onto64, dim=dims, keepdim=True).clamp_min(EPS)
    parallel = (v64 * unit).sum(dim=dims, keepdim=True) * unit
    return parallel.to(v.dtype), (v64 - parallel).to(v.dtype)


def cap_norm(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """Scale ``v`` down so its per-sample L2 norm is at most ``threshold`` (0 disables)."""
    if threshold <= 0:
        return v
    norm = torch.linalg.vector_norm(v.double(), dim=sample_dims(v), keepdim=True)
    return v * torch.clamp(threshold / norm.clamp_min(EPS), max=1.0).to(v.dtype)


def apg_update(diff: torch.Tensor, cond: torch.Tensor, eta: float, norm_threshold: float) -> torch.Tensor:
    """The APG guidance direction (Sadat et al. 2024, arXiv 2410.02416, Alg. 1).

    ``diff`` (cond - uncond, after momentum) is capped at ``norm_threshold``, split
    along ``cond``, and the parallel part (which oversaturates) scaled by ``eta``.
    Returns ``orthogonal + eta * parallel`` [B, ...].
    """
    parallel, orthogonal = project(cap_norm(diff, norm_threshold), cond)
    return orthogonal + eta * parallel


def momentum_update(running: torch.Tensor, diff: torch.Tensor, momentum: float) -> torch.Tensor:
    """APG's reverse momentum: ``running = diff + momentum * running`` (momentum < 0 pushes away)."""
    return diff + momentum * running


# --- tangential damping ----------------------------------------------------------------

def tangential_damping(cond_score: torch.Tensor, uncond_score: torch.Tensor) -> torch.Tensor:
    """TCFG (arXiv 2503.18137): keep only the part of uncond along the top singular direction.

    For each sample the 2 x N matrix A = [uncond; cond] (flattened scores) has a top
    right-singular vector v1; the damped uncond is ``(uncond . v1) v1``. v1 comes from
    the 2 x 2 Gram matrix A A^T in closed form (float64), which equals the SVD's
    answer at a fraction of its cost. Returns [B, ...] like uncond_score.
    """
    batch = cond_score.shape[0]
    a = torch.stack([uncond_score.reshape(batch, -1), cond_score.reshape(batch, -1)], dim=1).double()
    gram = a @ a.transpose(1, 2)  # [B, 2, 2]
    p, q, r = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    # top eigenvalue and eigenvector of [[p, q], [q, r]]
    half_gap = torch.sqrt(((p - r) / 2) ** 2 + q * q)
    top = (p + r) / 2 + half_gap
    # eigenvector (q, top - p), or (top - r, q); pick the better conditioned one
    e1 = torch.stack([q, top - p], dim=1)
    e2 = torch.stack([top - r, q], dim=1)
    use_first = e1.norm(dim=1) >= e2.norm(dim=1)
    u = torch.where(use_first[:, None], e1, e2)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(EPS)
    # v1 = A^T u / s1; projection of uncond onto v1 = (uncond . v1) v1
    v1 = (u[:, None, :] @ a).squeeze(1) / torch.sqrt(top).clamp_min(EPS)[:, None]
    damped = (a[:, 0] * v1).sum(dim=1, keepdim=True) * v1
    return damped.reshape(uncond_score.shape).to(uncond_score.dtype)


# --- Mahiro -------------------------------------------------------------------------------

def mahiro(cond: torch.Tensor, uncond: torch.Tensor, guided: torch.Tensor, scale: float) -> torch.Tensor:
    """Mahiro guidance (yoinked, blue-arxiv 2024-1208.1), with per-sample similarity.

    The positive "leap" ``scale * cond`` is blended with the CFG result by how similar
    their average is to the negative leap: ``w = (s * cfg + (4 - s) * leap) / 4`` with
    ``s = 2 * (1 + cos_sim)``; the signed square roots are compared. The cosine is taken
    over channels and averaged over positions of each sample only.
    """
    leap = cond * scale
    uncond_leap = uncond * scale
    merge = (leap + guided) / 2
    a = torch.sqrt(uncond_leap.abs()) * uncond_leap.sign()
    b = torch.sqrt(merge.abs()) * merge.sign()
    similarity = torch.nn.functional.cosine_similarity(a, b, dim=1)
    similarity = similarity.mean(dim=tuple(range(1, similarity.ndim))) if similarity.ndim > 1 else similarity
    s = per_sample(2 * (similarity + 1), guided)
    return (s * guided + (4 - s) * leap) / 4


# --- CFG-Zero* ---------------------------------------------------------------------------------

def zero_star_alpha(cond_score: torch.Tensor, uncond_score: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CFG-Zero*'s optimised scale (Fan et al. 2025, arXiv 2503.18886, eq. 6).

    ``alpha = <cond, uncond> / ||uncond||^2`` per sample, in float64. Returns [B, 1, ...].
    """
    dims = sample_dims(cond_score)
    c, u = cond_score.double(), uncond_score.double()
    alpha = (c * u).sum(dim=dims, keepdim=True) / ((u * u).sum(dim=dims, keepdim=True) + eps)
    return alpha.to(cond_score.dtype)


def zero_star(cond_score: torch.Tensor, uncond_score: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG-Zero* on scores (velocities or ``x - denoised``): ``alpha*u + scale*(c - alpha*u)``."""
    alpha = zero_star_alpha(cond_score, uncond_score)
    scaled_uncond = alpha * uncond_score
    return scaled_uncond + scale * (cond_score - scaled_uncond)

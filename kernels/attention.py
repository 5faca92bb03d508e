"""Attention-guidance math: Gaussian blurs, token grids, attention mass, query smoothing.

Pure torch, device- and dtype-agnostic. Token tensors are ``[B, N, C]`` with the
``N = h * w`` tokens of an image laid out row-major on an ``h x w`` grid.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# Above this sigma (in tokens) a query blur is "infinite": every query becomes the mean query.
INFINITE_BLUR = 9999.0


def gaussian_kernel1d(sigma: float, size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian taps [size] on the integer grid centred at 0 (sigma 0: a delta)."""
    half = (size - 1) / 2
    positions = torch.linspace(-half, half, size, device=device, dtype=torch.float32)
    if sigma <= 0:
        taps = (positions.abs() < 0.5).float()
    else:
        taps = torch.exp(-0.5 * (positions / sigma) ** 2)
    return (taps / taps.sum()).to(dtype)


def reflect_indices(length: int, pad: int, device=None) -> torch.Tensor:
    """Indices [length + 2 * pad] reading a signal of ``length`` with reflect padding (edge not repeated).

    Works for any length, also when ``pad >= length`` (the reflection folds again);
    a length-1 signal repeats its only value.
    """
    index = torch.arange(-pad, length + pad, device=device)
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = index.remainder(period)
    return torch.where(index >= length, period - index, index)


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: Optional[int] = None) -> torch.Tensor:
    """Separable Gaussian blur over the last two dims of x [..., H, W], reflect padding, any size.

    ``kernel_size`` defaults to ``2 * ceil(3 * sigma) + 1``; sigma 0 returns x. The
    result has x's shape and dtype (computed in float32 for half inputs).
    """
    if sigma <= 0:
        return x
    size = kernel_size or 2 * math.ceil(3 * sigma) + 1
    taps = gaussian_kernel1d(sigma, size, device=x.device)
    pad = size // 2
    height, width = x.shape[-2:]
    work = x.float().reshape(-1, 1, height, width)
    work = work.index_select(2, reflect_indices(height, pad, x.device))
    work = F.conv2d(work, taps.view(1, 1, size, 1))
    work = work.index_select(3, reflect_indices(width, pad, x.device))
    work = F.conv2d(work, taps.view(1, 1, 1, size))
    return work.reshape(x.shape).to(x.dtype)


def grid_level(height: int, width: int, tokens: int) -> Tuple[int, int, int]:
    """(h, w, level): the grid of ``tokens`` image tokens at UNet level ``level`` of a ``height x width`` latent.

    Each UNet downsample halves the grid rounding up (stride-2 conv with padding), so
    the level-k grid is ``ceil(height / 2^k) x ceil(width / 2^k)``; any aspect ratio,
    odd sizes included. Raises ValueError when no level has that many tokens (e.g.
    tokens already merged).
    """
    h, w, level = height, width, 0
    while True:
        if h * w == tokens:
            return h, w, level
        if h * w < tokens or (h == 1 and w == 1):
            raise ValueError(f"{tokens} tokens do not form a downsampled grid of a {height}x{width} latent")
        h, w, level = (h + 1) // 2, (w + 1) // 2, level + 1


def token_grid(height: int, width: int, tokens: int) -> Tuple[int, int]:
    """The ``h x w`` grid of :func:`grid_level`."""
    h, w, _ = grid_level(height, width, tokens)
    return h, w


def attention_column_mass(q: torch.Tensor, k: torch.Tensor, heads: int, query_chunk: int = 1024) -> torch.Tensor:
    """How much attention each key receives, summed over queries and averaged over heads.

    q [B, Nq, H*D], k [B, Nk, H*D] -> [B, Nk] float32:
    ``mass[b, j] = mean_h sum_i softmax_j(q_bhi . k_bhj / sqrt(D))``. Queries are
    processed in chunks, so memory is O(H * chunk * Nk), never the whole Nq x Nk map.
    For self-attention the mean over keys is 1 (each softmax row sums to 1).
    """
    batch, n_queries, width = q.shape
    dim = width // heads
    qh = q.float().reshape(batch, n_queries, heads, dim).transpose(1, 2)
    kh = k.float().reshape(batch, -1, heads, dim).transpose(1, 2)
    mass = torch.zeros(batch, heads, kh.shape[2], device=q.device, dtype=torch.float32)
    scale = dim ** -0.5
    for start in range(0, n_queries, query_chunk):
        logits = qh[:, :, start:start + query_chunk] @ kh.transpose(-1, -2) * scale
        mass += logits.softmax(dim=-1).sum(dim=2)
    return mass.mean(dim=1)


def attention_mask_on_latent(mass: torch.Tensor, grid: Tuple[int, int], threshold: float,
                             latent_hw: Tuple[int, int]) -> torch.Tensor:
    """SAG's mask: tokens receiving more than ``threshold`` attention, upsampled to the latent.

    mass [B, h*w] -> [B, 1, H, W] float32 of 0/1 (nearest-neighbour upsampling).
    """
    mask = (mass > threshold).float().reshape(mass.shape[0], 1, *grid)
    return F.interpolate(mask, size=latent_hw, mode="nearest")


def degrade(x0: torch.Tensor, mask: torch.Tensor, blur_sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """Self-attention guidance's adversarial blur (Hong et al. 2023, arXiv 2210.00939, eq. 11).

    Blur the prediction x0 [B, C, H, W] where mask [B, 1, H, W] is 1, keep it elsewhere.
    """
    blurred = gaussian_blur(x0, blur_sigma, kernel_size)
    mask = mask.to(x0.dtype)
    return blurred * mask + x0 * (1 - mask)


def blur_queries(q: torch.Tensor, grid: Tuple[int, ...], sigma: float) -> torch.Tensor:
    """Smoothed Energy Guidance's query blur (Hong 2024, arXiv 2408.00760).

    Blurring the queries on the token grid blurs the attention energy landscape.
    q [B, N, C] with N = h * w (``grid`` (h, w)) or N = t * h * w (``grid`` (t, h, w), a video's
    frames in order) -> same shape and dtype. A video is blurred frame by frame: SEG smooths the
    spatial energy landscape of a picture, and blurring across frames would average motion away
    (at the infinite limit, the whole clip into one query). ``sigma >= INFINITE_BLUR`` replaces
    every query by its frame's mean query (uniform attention weights' limit).
    """
    frames, (height, width) = (grid[0], grid[1:]) if len(grid) == 3 else (1, grid)
    batch, tokens, channels = q.shape
    q = q.reshape(batch * frames, height * width, channels)
    if sigma >= INFINITE_BLUR:
        out = q.mean(dim=1, keepdim=True).expand_as(q)
    else:
        image = q.transpose(1, 2).reshape(batch * frames, channels, height, width)
        out = gaussian_blur(image, sigma).reshape(batch * frames, channels, height * width).transpose(1, 2)
    return out.reshape(batch, tokens, channels).contiguous()


def joint_identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: Tuple[int, int],
                             image: Tuple[int, int], query_chunk: int = 1024) -> torch.Tensor:
    """PAG on joint (text + image) attention: each image query attends to the text keys and its own key only.

    q, k, v [B, H, N, D] (heads split); ``text`` and ``image`` are ``(start, stop)`` token
    ranges of N (either order; ``text`` may be empty). Returns the image rows [B, H, n_image, D]
    in v's dtype: ``softmax([q_i . k_text, q_i . k_i] / sqrt(D)) @ [v_text; v_i]``. With no
    text this is the identity (``v`` of the image rows). Memory is O(H * chunk * n_text),
    never an image-by-image map; logits and softmax in float32.
    """
    scale = q.shape[-1] ** -0.5
    k_text = k[:, :, text[0]:text[1]].float()
    v_text = v[:, :, text[0]:text[1]].float()
    parts = []
    for start in range(image[0], image[1], query_chunk):
        stop = min(start + query_chunk, image[1])
        query = q[:, :, start:stop].float()
        own = (query * k[:, :, start:stop].float()).sum(dim=-1, keepdim=True) * scale
        weights = torch.cat([query @ k_text.transpose(-1, -2) * scale, own], dim=-1).softmax(dim=-1)
        parts.append(weights[..., :-1] @ v_text + weights[..., -1:] * v[:, :, start:stop].float())
    return torch.cat(parts, dim=2).to(v.dtype)


def blur_grid_queries(q: torch.Tensor, start: int, grid: Tuple[int, ...], sigma: float) -> torch.Tensor:
    """SEG on a DiT token sequence: blur the queries of the image grid, leave every other token as it is.

    q [B, H, N, D] (heads split); tokens ``start .. start + prod(grid)`` are the image's
    ``h x w`` grid (or a video's ``t x h x w``, frame-major), row-major. Returns a new tensor of
    q's shape and dtype (``sigma >= INFINITE_BLUR``: every grid query becomes its frame's mean query).
    """
    batch, heads, _, dim = q.shape
    stop = start + math.prod(grid)
    tokens = q[:, :, start:stop].transpose(1, 2).reshape(batch, stop - start, heads * dim)
    blurred = blur_queries(tokens, grid, sigma).reshape(batch, stop - start, heads, dim).transpose(1, 2)
    out = q.clone()
    out[:, :, start:stop] = blurred
    return out


def normalized_attention_guidance(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float,
                                  alpha: float) -> torch.Tensor:
    """Normalized Attention Guidance (Chen et al. 2025, arXiv 2505.21179) on attention outputs.

    ``z_pos``, ``z_neg`` [..., C]: the same queries attending to the positive and the negative prompt's
    keys and values (e.g. [B, N, C]). Per token, ``z~ = s * z+ - (s - 1) * z-``; where
    ``||z~||_1 / ||z+||_1`` exceeds ``tau`` it is scaled down to exactly ``tau``; the result is
    ``alpha * z~ + (1 - alpha) * z+``. ``scale`` 1 or ``alpha`` 0 give ``z+`` itself. Norms in float32;
    a token whose ``z+`` is zero keeps ``z+`` (its ratio is undefined). Returns z_pos's shape and dtype.
    """
    pos, neg = z_pos.float(), z_neg.float()
    guided = pos * scale - neg * (scale - 1.0)
    norm_pos = pos.abs().sum(dim=-1, keepdim=True)
    norm_guided = guided.abs().sum(dim=-1, keepdim=True)
    ratio = norm_guided / norm_pos.clamp_min(torch.finfo(torch.float32).tiny)
    shrink = torch.where(ratio > tau, tau / ratio.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(ratio))
    guided = torch.where(norm_pos > 0, guided * shrink, pos)
    return (alpha * guided + (1.0 - alpha) * pos).to(z_pos.dtype)


def token_permutation(tokens: int, seed: int, device=None) -> torch.Tensor:
    """A permutation of ``tokens`` indices [tokens] (int64) drawn from its own generator seeded with ``seed``
    (never the global RNG): the same seed gives the same permutation on every device."""
    generator = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randperm(tokens, generator=generator).to(device)


def shuffle_tokens(x: torch.Tensor, start: int, stop: int, permutation: torch.Tensor) -> torch.Tensor:
    """Token Perturbation Guidance's shuffle (Rajabi et al. 2025, arXiv 2506.10036): tokens ``start .. stop`` of
    x [B, N, C] reordered by ``permutation`` [stop - start]; other tokens kept. A new tensor (norm-preserving:
    the same set of token vectors)."""
    out = x.clone()
    out[:, start:stop] = x[:, start:stop][:, permutation.to(x.device)]
    return out


def unshuffle_tokens(x: torch.Tensor, start: int, stop: int, permutation: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`shuffle_tokens`: token ``j`` of the shuffled order x [B, N, C] (``start`` onwards)
    goes back to where it came from, ``start + permutation[j]``; other tokens kept. A new tensor."""
    out = x.clone()
    out[:, start:stop] = x[:, start:stop][:, torch.argsort(permutation.to(x.device))]
    return out

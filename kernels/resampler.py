"""InstantID's image projection: a Perceiver-style Resampler, in pure torch.

Turns face embeddings [B, N, E] (InstantID: the 512-d recognition embedding, N = 1)
into ``num_queries`` tokens [B, Q, D_out] (InstantID: 16 x 2048) that the UNet's
cross-attention layers attend to. Structure (key names of the released weights):
``latents`` [1, Q, D]; ``proj_in`` E -> D; ``layers.{i}.0`` attention in which the
learned latents query ``concat(inputs, latents)`` (LayerNorm on both, bias-free
projections, heads of 64); ``layers.{i}.1`` feed-forward LayerNorm, Linear D -> 4D,
GELU, Linear 4D -> D; ``proj_out`` D -> D_out; ``norm_out``.
Dimensions are read from a state dict, so any width works (tests use tiny ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64


@dataclass(frozen=True)
class ResamplerShape:
    dim: int
    depth: int
    inner: int
    num_queries: int
    embedding_dim: int
    output_dim: int
    ff_dim: int

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor]) -> ResamplerShape:
        """The shape a state dict describes; KeyError if a key the shape needs is missing."""
        layers = {int(m.group(1)) for k in sd for m in [re.match(r"layers\.(\d+)\.", k)] if m}
        _, queries, dim = sd["latents"].shape
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        return cls(dim=dim, depth=len(layers), inner=inner, num_queries=queries,
                   embedding_dim=sd["proj_in.weight"].shape[1], output_dim=sd["proj_out.weight"].shape[0],
                   ff_dim=sd["layers.0.1.1.weight"].shape[0])

    @property
    def heads(self) -> int:
        return max(1, self.inner // HEAD_DIM)

    def expected(self) -> Dict[str, tuple]:
        """Every key of this shape with its tensor shape."""
        inner = self.inner
        shapes = {
            "latents": (1, self.num_queries, self.dim),
            "proj_in.weight": (self.dim, self.embedding_dim), "proj_in.bias": (self.dim,),
            "proj_out.weight": (self.output_dim, self.dim), "proj_out.bias": (self.output_dim,),
            "norm_out.weight": (self.output_dim,), "norm_out.bias": (self.output_dim,),
        }
        for i in range(self.depth):
            for norm in ("norm1", "norm2"):
                shapes[f"layers.{i}.0.{norm}.weight"] = (self.dim,)
                shapes[f"layers.{i}.0.{norm}.bias"] = (self.dim,)
            shapes[f"layers.{i}.0.to_q.weight"] = (inner, self.dim)
            shapes[f"layers.{i}.0.to_kv.weight"] = (2 * inner, self.dim)
            shapes[f"layers.{i}.0.to_out.weight"] = (self.dim, inner)
            shapes[f"layers.{i}.1.0.weight"] = (self.dim,)
            shapes[f"layers.{i}.1.0.bias"] = (self.dim,)
            shapes[f"layers.{i}.1.1.weight"] = (self.ff_dim, self.dim)
            shapes[f"layers.{i}.1.3.weight"] = (self.dim, self.ff_dim)
        return shapes


def shape_problems(sd: Dict[str, torch.Tensor], shape: ResamplerShape) -> List[str]:
    """Human-readable differences between a state dict and ``shape``: missing, unexpected, mis-shaped keys."""
    expected = shape.expected()
    problems = [f"missing {k}" for k in sorted(set(expected) - set(sd))]
    problems += [f"unexpected {k}" for k in sorted(set(sd) - set(expected))]
    problems += [f"{k} has shape {tuple(sd[k].shape)}, expected {expected[k]}"
                 for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k]]
    return problems


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, inner: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] inputs, latents [B, Q, D] -> [B, Q, D]."""
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        batch = q.shape[0]

        def heads(t):
            return t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).reshape(batch, q.shape[1], -1))


class Resampler(nn.Module):
    def __init__(self, shape: ResamplerShape):
        super().__init__()
        inner = shape.inner
        self.latents = nn.Parameter(torch.zeros(1, shape.num_queries, shape.dim))
        self.proj_in = nn.Linear(shape.embedding_dim, shape.dim)
        self.proj_out = nn.Linear(shape.dim, shape.output_dim)
        self.norm_out = nn.LayerNorm(shape.output_dim)
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PerceiverAttention(shape.dim, shape.heads, inner),
                nn.Sequential(nn.LayerNorm(shape.dim), nn.Linear(shape.dim, shape.ff_dim, bias=False), nn.GELU(),
                              nn.Linear(shape.ff_dim, shape.dim, bias=False)),
            ])
            for _ in range(shape.depth)
        ])

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor]) -> Resampler:
        module = cls(ResamplerShape.from_state_dict(sd))
        module.load_state_dict(sd)
        return module

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [B, E] or [B, N, E] -> tokens [B, Q, D_out]."""
        x = self.proj_in(embeds if embeds.ndim == 3 else embeds[:, None])
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))

"""W5: an Alpamayo-style action expert, a plain-torch Qwen-style decoder stack over a prompt KV cache.

The noisy trajectory ``x [B, 64, 2]`` becomes 64 action tokens (a linear embedding of each
waypoint plus a sinusoidal embedding of ``t``); each layer is RMSNorm, grouped-query attention
with rotary positions and per-head q/k RMSNorm (Qwen3), then RMSNorm and a SwiGLU MLP; a final
RMSNorm and a projection give the velocity ``[B, 64, 2]`` in bf16.

The prompt KV is held in **static buffers** ``[B, kv_heads, prefix + 64, head_dim]`` per layer:
:meth:`ActionExpert.set_prefix` copies a scene's prompt KV into their first ``prefix`` positions
(in place, between replays), and every forward writes the action tokens' own K/V into the last 64
positions (in place) before ``scaled_dot_product_attention`` over the whole buffer. That is the
capturable form of Alpamayo's "append the action tokens to the KV cache, then crop it back": no
tensor is reallocated or rebound, so one CUDA graph can hold all the steps.

Sizes (:data:`CONFIGS`): ``2b`` is the scale of Qwen3-1.7B's blocks (hidden 2048, 16 query / 8 KV
heads of 128, SwiGLU 6144) in 12 layers over a 2,048-token prompt, ~600 M parameters (1.2 GB in
bf16); ``small`` runs on CPU in ``pytest bench/`` in milliseconds.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

ACTION_TOKENS = 64  # Alpamayo's 64 waypoints
WAYPOINT_DIMS = 2  # [acceleration, curvature]


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    prefix: int
    mlp: int
    head_dim: int = 128
    rope_theta: float = 1e6  # Qwen3's
    eps: float = 1e-6


CONFIGS = {
    "2b": ExpertConfig(hidden=2048, heads=16, kv_heads=8, layers=12, prefix=2048, mlp=6144),
    "small": ExpertConfig(hidden=64, heads=4, kv_heads=2, layers=2, prefix=32, mlp=128, head_dim=16),
}


class RMSNorm(nn.Module):
    """Qwen's RMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, dim, eps, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.eps = eps

    def forward(self, h):
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h32.to(h.dtype)


def rotate(h, cos, sin):
    """Rotary positions, the half-split convention (Llama/Qwen ``rotate_half``)."""
    a, b = h.chunk(2, dim=-1)
    return h * cos + torch.cat([-b, a], dim=-1) * sin


class Layer(nn.Module):
    def __init__(self, cfg: ExpertConfig, batch: int, **factory):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.attn_norm = RMSNorm(cfg.hidden, cfg.eps, **factory)
        self.q = nn.Linear(cfg.hidden, cfg.heads * hd, bias=False, **factory)
        self.kv = nn.Linear(cfg.hidden, 2 * cfg.kv_heads * hd, bias=False, **factory)
        self.q_norm = RMSNorm(hd, cfg.eps, **factory)
        self.k_norm = RMSNorm(hd, cfg.eps, **factory)
        self.o = nn.Linear(cfg.heads * hd, cfg.hidden, bias=False, **factory)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.eps, **factory)
        self.gate_up = nn.Linear(cfg.hidden, 2 * cfg.mlp, bias=False, **factory)
        self.down = nn.Linear(cfg.mlp, cfg.hidden, bias=False, **factory)
        # [prompt KV; action tokens' KV]: the prompt part is written by set_prefix, the tail by
        # every forward. Static: never reallocated, so a CUDA graph can read and write it.
        cache = (batch, cfg.kv_heads, cfg.prefix + ACTION_TOKENS, hd)
        self.register_buffer("k_cache", torch.zeros(cache, **factory), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache, **factory), persistent=False)

    def forward(self, h, cos, sin):
        cfg, b, n = self.cfg, h.shape[0], h.shape[1]
        a = self.attn_norm(h)
        q = self.q_norm(self.q(a).view(b, n, cfg.heads, cfg.head_dim)).transpose(1, 2)
        k, v = self.kv(a).view(b, n, 2, cfg.kv_heads, cfg.head_dim).unbind(2)
        k = self.k_norm(k).transpose(1, 2)
        self.k_cache[:, :, cfg.prefix:].copy_(rotate(k, cos, sin))
        self.v_cache[:, :, cfg.prefix:].copy_(v.transpose(1, 2))
        # Action tokens attend to the whole prompt and to each other (no mask).
        att = F.scaled_dot_product_attention(rotate(q, cos, sin), self.k_cache, self.v_cache,
                                             enable_gqa=True)
        h = h + self.o(att.transpose(1, 2).reshape(b, n, cfg.heads * cfg.head_dim))
        gate, up = self.gate_up(self.mlp_norm(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


class ActionExpert(nn.Module):
    """The W5 field ``expert(x=x, t=t) -> v`` (bf16), for a fixed batch (the KV buffers' rows).

    Weights are drawn from ``seed`` (std 0.02, the usual init) on ``device`` directly.
    """

    def __init__(self, cfg: ExpertConfig, batch: int, device="cpu", dtype=torch.bfloat16,
                 seed: int = 0, t_dim: int = 256):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.cfg, self.batch, self.dtype = cfg, batch, dtype
        self.inp = nn.Linear(WAYPOINT_DIMS, cfg.hidden, **factory)
        self.t_proj = nn.Linear(t_dim, cfg.hidden, **factory)
        self.layers = nn.ModuleList(Layer(cfg, batch, **factory) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps, **factory)
        self.out = nn.Linear(cfg.hidden, WAYPOINT_DIMS, **factory)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.02)
        freqs = torch.exp(-math.log(1e4) * torch.arange(t_dim // 2, device=device) / (t_dim // 2))
        self.register_buffer("t_freqs", freqs, persistent=False)
        # The action tokens sit after the prompt: positions prefix .. prefix + 63.
        pos = torch.arange(cfg.prefix, cfg.prefix + ACTION_TOKENS, device=device, dtype=torch.float64)
        inv = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, device=device,
                                               dtype=torch.float64) / cfg.head_dim)
        angles = torch.outer(pos, inv).repeat(1, 2)
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)

    @torch.no_grad()
    def set_prefix(self, keys, values):
        """Copy one scene's prompt KV (per layer ``[kv_heads, prefix, head_dim]``, or with a
        leading batch dimension) into the static buffers, in place: the next forward (or graph
        replay) attends to it."""
        cfg = self.cfg
        want = (cfg.layers, cfg.kv_heads, cfg.prefix, cfg.head_dim)
        for name, kv in (("keys", keys), ("values", values)):
            if tuple(kv.shape[-3:]) != want[1:] or len(kv) != cfg.layers:
                raise ValueError(f"{name} must be [layers, (batch,) kv_heads, prefix, head_dim] = "
                                 f"{want}; got {tuple(kv.shape)}")
        for layer, k, v in zip(self.layers, keys, values):
            layer.k_cache[:, :, :cfg.prefix].copy_(k)
            layer.v_cache[:, :, :cfg.prefix].copy_(v)

    def random_prefix(self, seed: int = 1):
        """A scene's prompt KV drawn at random: ``(keys, values)`` for :meth:`set_prefix`."""
        cfg = self.cfg
        device = self.cos.device
        gen = torch.Generator(device=device).manual_seed(seed)
        shape = (cfg.layers, cfg.kv_heads, cfg.prefix, cfg.head_dim)
        return tuple(torch.randn(shape, generator=gen, device=device).to(self.dtype)
                     for _ in range(2))

    def forward(self, *, x, t):
        if x.shape[0] != self.batch or tuple(x.shape[1:]) != (ACTION_TOKENS, WAYPOINT_DIMS):
            raise ValueError(f"x must be [{self.batch}, {ACTION_TOKENS}, {WAYPOINT_DIMS}] (the KV "
                             f"buffers' batch); got {tuple(x.shape)}")
        angles = t.reshape(-1, 1).float() * self.t_freqs
        temb = self.t_proj(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.dtype))
        h = self.inp(x.to(self.dtype)) + temb[:, None, :]
        for layer in self.layers:
            h = layer(h, self.cos, self.sin)
        return self.out(self.norm(h))

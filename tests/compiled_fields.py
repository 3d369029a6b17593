"""The fields and helpers the compiled-mode tests share (tests/test_compiled_mode.py,
tests/test_compiled_cache.py): a state of ``DIMS`` x ``B`` and fields of the kinds that compile
bitwise (element-wise, ``tanh(x @ W)``, a SiLU MLP) or not (a LayerNorm)."""

import torch
from torch._dynamo.utils import counters

from fields import smooth

DIMS, B = (16, 2), 5


def elementwise(*, x, t):
    return smooth(x, t).to(torch.bfloat16)


_W = (torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) / 4).to(torch.bfloat16)


def tanh_matmul(*, x, t):
    return torch.tanh((x.flatten(1) + t.flatten(1)).to(torch.bfloat16) @ _W).view(x.shape)


class SiLUMLP(torch.nn.Module):
    """A small bf16 MLP with biases and a sin/cos time embedding."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        torch.manual_seed(3)
        self.inp = torch.nn.Linear(d + 2, hidden)
        self.out = torch.nn.Linear(hidden, d)
        self.to(torch.bfloat16)

    def forward(self, *, x, t):
        tt = t.flatten(1).float()
        h = torch.cat([x.flatten(1), tt.sin(), tt.cos()], dim=1).to(torch.bfloat16)
        return self.out(torch.nn.functional.silu(self.inp(h))).view(x.shape)


def layer_norm_field(*, x, t):
    """Inductor reduces the LayerNorm in its own order: its compiled form is not bitwise."""
    h = torch.nn.functional.layer_norm(x.flatten(1) + t.flatten(1), (32,))
    return (h @ _W.float()).view(x.shape)


def unique_graphs():
    return counters["stats"]["unique_graphs"]


def configs():
    import torch._dynamo.config
    import torch._inductor.config

    return torch._inductor.config.get_config_copy(), torch._dynamo.config.get_config_copy()

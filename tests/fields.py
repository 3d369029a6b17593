"""The tests' fields: the dtypes and memory layouts every parity test draws from.

``make_field``: a deterministic field ``step_fn(*, x, t)`` for sampling (a fresh callable per run:
some keep a call counter). ``make_velocity``: one velocity tensor, as a kernel receives it.
"""

import torch

FIELD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LAYOUTS = ("contiguous", "permuted", "strided", "batch1", "expanded", "mixed")
# The layouts of one velocity tensor handed to a kernel (make_velocity).
TENSOR_LAYOUTS = ("contiguous", "transposed", "strided", "batch1", "expanded", "misaligned")


def smooth(x, t):
    """A cheap field that depends on the state and the time (float32 math for a float32 x)."""
    return torch.sin(1.7 * x) - 0.5 * x * t + t


def make_field(layout: str, dtype: torch.dtype, x_dims, seed: int = 0):
    calls = [0]
    gen = torch.Generator().manual_seed(seed)
    stored = torch.randn(1, *x_dims, generator=gen)  # for the [1, *x_dims] broadcast field

    def field(*, x, t):
        calls[0] += 1
        v = smooth(x, t)
        if layout == "contiguous":
            return v.to(dtype)
        if layout == "permuted":  # same shape, every stride reversed
            out = torch.empty(tuple(reversed(x.shape)), dtype=dtype, device=x.device)
            out = out.permute(*reversed(range(x.dim())))
            return out.copy_(v)
        if layout == "strided":  # every other element of a wider buffer, odd storage offset
            shape = list(x.shape)
            wide = torch.empty(*shape[:-1], 2 * shape[-1] + 1, dtype=dtype, device=x.device)
            return wide[..., 1::2].copy_(v)
        if layout == "batch1":  # a [1, *x_dims] field, broadcast over the batch
            return (stored.to(x.device) * (1.0 + calls[0] * 0.25)).to(dtype)
        if layout == "expanded":  # batch stride 0, same shape as x
            return v[:1].to(dtype).expand_as(x)
        if layout == "mixed":  # dtype changes from call to call; float64 arrives late
            dtypes = (torch.bfloat16, torch.float32, torch.float16, dtype)
            return v.to(dtypes[calls[0] % len(dtypes)])
        raise ValueError(layout)

    return field


def make_velocity(layout: str, shape, dtype: torch.dtype, device, gen: torch.Generator):
    """A velocity of ``shape`` (values ``3 * randn`` from ``gen``) in one of ``TENSOR_LAYOUTS``."""
    data = torch.randn(shape, generator=gen).mul_(3)
    if layout == "contiguous":
        return data.to(device, dtype)
    if layout == "transposed":  # first and last dims swapped in memory
        return data.to(device, dtype).transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided":  # every third element of a wider buffer
        wide = torch.zeros(*shape[:-1], 3 * shape[-1], dtype=dtype, device=device)
        return wide[..., ::3].copy_(data)
    if layout == "batch1":  # [1, *dims]: the kernel broadcasts it over the batch
        return data[:1].to(device, dtype)
    if layout == "expanded":  # already expanded: batch stride 0
        return data[:1].to(device, dtype).expand(shape)
    if layout == "misaligned":  # storage offset of one element: no 16-byte alignment
        flat = torch.zeros(data.numel() + 1, dtype=dtype, device=device)
        return flat[1:].view(shape).copy_(data)
    raise ValueError(layout)

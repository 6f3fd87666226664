"""Tokens kept at low precision, stored as packed integer codes: what MiKV-style retention holds.

Codes come from `kvsim.policies.retention.quantize`, the same rounding the simulator applies, and
are packed several to a byte when the bit width divides 8 (1, 2, 4, 8 bits); other widths keep one
code per byte. Each token and head also keeps a scale and a zero point in the cache's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.retention import dequantize, quantize


@dataclass
class PackedTokens:
    """Low-precision keys or values: codes [..., m, packed_dim] uint8, one row per token."""

    codes: torch.Tensor
    scale: torch.Tensor  # [..., m, 1]
    zero: torch.Tensor  # [..., m, 1]
    bits: int
    dim: int

    @classmethod
    def pack(cls, x: torch.Tensor, bits: int) -> PackedTokens:
        codes, scale, zero = quantize(x.float(), bits)
        return cls(_pack(codes, bits), scale.to(x.dtype), zero.to(x.dtype), bits, x.shape[-1])

    def unpack(self) -> torch.Tensor:
        """[..., m, dim] in the dtype of the scales: the values attention reads."""
        codes = _unpack(self.codes, self.bits, self.dim)
        return dequantize(codes, self.scale.float(), self.zero.float()).to(self.scale.dtype)

    def serving_nbytes(self, element_bytes: int) -> int:
        """Bytes held, with scales and zero points counted at the serving dtype's `element_bytes`."""
        return self.codes.numel() + (self.scale.numel() + self.zero.numel()) * element_bytes

    @staticmethod
    def interleave(old: PackedTokens, old_counts: list[int], new: PackedTokens, new_counts: list[int]) -> PackedTokens:
        """Per-head ragged append: head h's new tokens follow head h's old ones (see `kvsim.policies.held`)."""
        def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([t for pair in zip(torch.split(a, old_counts), torch.split(b, new_counts)) for t in pair])

        return PackedTokens(merge(old.codes, new.codes), merge(old.scale, new.scale), merge(old.zero, new.zero), old.bits, old.dim)


def _per_byte(bits: int) -> int:
    return 8 // bits if 8 % bits == 0 else 1


def packed_dim(dim: int, bits: int) -> int:
    """Bytes of packed codes per token row of `dim` elements."""
    return -(-dim // _per_byte(bits))


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = _per_byte(bits)
    if per == 1:
        return codes
    pad = packed_dim(codes.shape[-1], bits) * per - codes.shape[-1]
    codes = torch.nn.functional.pad(codes, (0, pad)).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per = _per_byte(bits)
    if per == 1:
        return packed
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    codes = (packed[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :dim]

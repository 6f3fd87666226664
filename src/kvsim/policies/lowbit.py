"""Tokens kept at low precision, stored as packed integer codes: what MiKV-style retention holds.

Codes come from `kvsim.policies.retention.quantize` (or `quantize_channels`), the same rounding the
simulator applies, and are packed several to a byte when the bit width divides 8 (1, 2, 4, 8 bits);
other widths keep one code per byte. Each token and head also keeps a scale and a zero point in the
cache's dtype, or, for KIVI's per-channel keys, each group of `group` tokens of a head keeps one
per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.retention import dequantize, dequantize_channels, quantize, quantize_channels


@dataclass
class PackedTokens:
    """Low-precision keys or values: codes [..., m, packed_dim] uint8, one row per token.

    Per token (group 0): scale and zero [..., m, 1]. Per channel (group G, flat rows of several
    heads, `counts` tokens each): scale and zero [g, dim], each head's ceil(count / G) groups in turn.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    dim: int
    group: int = 0
    counts: list[int] | None = None

    @classmethod
    def pack(cls, x: torch.Tensor, bits: int) -> PackedTokens:
        codes, scale, zero = quantize(x.float(), bits)
        return cls(_pack(codes, bits), scale.to(x.dtype), zero.to(x.dtype), bits, x.shape[-1])

    @classmethod
    def pack_channels(cls, x: torch.Tensor, bits: int, group: int, counts: list[int]) -> PackedTokens:
        """Flat [N, dim] rows, `counts[h]` of head h in position order, per channel over `group` tokens."""
        parts = [quantize_channels(rows.float(), bits, group) for rows in torch.split(x, counts)]
        codes, scale, zero = (torch.cat([part[i] for part in parts]) for i in range(3))
        return cls(_pack(codes, bits), scale.to(x.dtype), zero.to(x.dtype), bits, x.shape[-1], group, list(counts))

    def unpack(self) -> torch.Tensor:
        """[..., m, dim] in the dtype of the scales: the values attention reads."""
        codes = _unpack(self.codes, self.bits, self.dim)
        if not self.group:
            return dequantize(codes, self.scale.float(), self.zero.float()).to(self.scale.dtype)
        groups = [-(-count // self.group) for count in self.counts]
        heads = zip(torch.split(codes, self.counts), torch.split(self.scale.float(), groups), torch.split(self.zero.float(), groups))
        return torch.cat([dequantize_channels(c, scale, zero, self.group) for c, scale, zero in heads]).to(self.scale.dtype)

    def serving_nbytes(self, element_bytes: int) -> int:
        """Bytes held, with scales and zero points counted at the serving dtype's `element_bytes`."""
        return self.codes.numel() + (self.scale.numel() + self.zero.numel()) * element_bytes

    @staticmethod
    def cat(parts: list[PackedTokens]) -> PackedTokens:
        """Several flat sets of rows, one after the other (of equal bit width and grouping)."""
        first = parts[0]
        if any((part.bits, part.dim, part.group) != (first.bits, first.dim, first.group) for part in parts):
            raise ValueError("packed tokens of different bit widths or groupings cannot share one tensor")
        counts = None if first.counts is None else [count for part in parts for count in part.counts]
        return PackedTokens(*(torch.cat([getattr(part, name) for part in parts]) for name in ("codes", "scale", "zero")), first.bits, first.dim, first.group, counts)

    @staticmethod
    def interleave(old: PackedTokens, old_counts: list[int], new: PackedTokens, new_counts: list[int]) -> PackedTokens:
        """Per-head ragged append: head h's new tokens follow head h's old ones (see `kvsim.policies.held`)."""
        if old.group or new.group:
            # Only mixed_precision groups keys per channel, and it picks its low-precision tokens once.
            raise ValueError("per-channel keys are packed once, at the prompt's decision: they cannot be appended to")
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

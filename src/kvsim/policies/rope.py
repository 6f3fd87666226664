"""Rotary position embedding (RoPE) in one place: the model's frequencies, rotating and unrotating.

Scorers that reason about queries at positions other than the ones observed (Expected Attention)
need the model's rotation. It is read once from the model (`Rotary.from_model`: its rotary
module's `inv_freq` and `attention_scaling`, so every RoPE variant transformers implements, such as
Llama 3's scaled frequencies, comes out exact) and stored with the TraceSet's model metadata, so the
simulator and the live cache rotate with the same numbers.

Convention (transformers' Llama, Mistral and Qwen2/3): angle θ_i(t) = t · inv_freq_i, the head
dimension is split in halves, x' = s · (x ⊙ cos θ + rotate_half(x) ⊙ sin θ) with
rotate_half([a, b]) = [−b, a] and s the attention scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.errors import KvsimError


@dataclass(frozen=True)
class Rotary:
    inv_freq: tuple[float, ...]  # head_dim / 2 frequencies
    attention_scaling: float = 1.0

    @classmethod
    def from_model(cls, model) -> Rotary:
        rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        if rotary is None:
            raise KvsimError(f"{type(model).__name__} has no rotary embedding module: its RoPE cannot be read")
        # Gemma 3 keeps one RoPE per layer type; policies decide on the full-attention layers (`kvsim.shape`).
        prefix = "" if hasattr(rotary, "inv_freq") else "full_attention_"
        inv_freq, scaling = getattr(rotary, f"{prefix}inv_freq"), getattr(rotary, f"{prefix}attention_scaling")
        return cls(tuple(float(f) for f in inv_freq.float().tolist()), float(scaling))

    @classmethod
    def from_meta(cls, meta: dict | None) -> Rotary | None:
        """From a TraceSet's `model.rope` entry (absent in sets captured before it was stored)."""
        if not meta:
            return None
        return cls(tuple(meta["inv_freq"]), float(meta["attention_scaling"]))

    def to_meta(self) -> dict:
        return {"inv_freq": list(self.inv_freq), "attention_scaling": self.attention_scaling}

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [len(positions), head_dim], scaled, halves repeated (as transformers builds them)."""
        angles = positions.double()[:, None] * torch.tensor(self.inv_freq, dtype=torch.float64)[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * self.attention_scaling).float(), (angles.sin() * self.attention_scaling).float()

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE vectors from post-RoPE `x` [..., len(positions), head_dim] (the inverse rotation)."""
        cos, sin = self.cos_sin(positions)
        scale = self.attention_scaling**2
        return (x * cos - rotate_half(x) * sin) / scale

    def mean_rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """[head_dim, head_dim]: the rotation matrix averaged over `positions`, R̄ = mean_t (C_t + P S_t)
        with C_t, S_t the diagonal cos, sin at t and P the matrix of rotate_half (R̄ x = mean_t x'_t)."""
        cos, sin = self.cos_sin(positions)
        half = cos.shape[-1] // 2
        rotate = torch.zeros(2 * half, 2 * half)
        rotate[half:, :half] = torch.eye(half)
        rotate[:half, half:] = -torch.eye(half)
        return torch.diag(cos.mean(0)) + rotate * sin.mean(0)[None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)

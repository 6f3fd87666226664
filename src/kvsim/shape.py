"""`ModelShape`: the facts about a model that capture, the simulator, the live cache and export
depend on, computed once from its config and stored typed in every TraceSet and export.

A layer is either full attention (every earlier token) or sliding (the last `window` tokens,
itself included: key j is visible to query i when i − window < j ≤ i, transformers'
`sliding_window_overlay`). Sliding layers hold at most their window by construction, so a policy
decides only on the full-attention layers: those are the policy's layers, in model order.

Adding an architecture is one `ARCHITECTURES` entry (and its tiny config in the tests): everything
else is read from the config the same way for every model type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvsim.errors import KvsimError

# model_type -> the config field whose −½ power scales attention scores, or None for 1/sqrt(head_dim).
# Sources: transformers' modeling_<type>.py, `self.scaling` of each attention module.
ARCHITECTURES: dict[str, str | None] = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "phi3": None,
    "gemma3_text": "query_pre_attn_scalar",  # Gemma 3: query_pre_attn_scalar**-0.5 (256 for the 270M)
}

FULL = "full"
SLIDING = "sliding"


def check_architecture(model_type: str) -> None:
    if model_type not in ARCHITECTURES:
        raise KvsimError(f"model type {model_type!r} is not supported: use one of {', '.join(ARCHITECTURES)}")


@dataclass(frozen=True)
class ModelShape:
    """Layers, heads, head_dim, the attention scale and each layer's kind.

    windows: per layer, None for full attention or the sliding window in tokens.
    softcap: attention-logit soft-capping (tanh) or None; kvsim's attention applies none, so a
        model that uses it is refused at load.
    """

    model_type: str
    n_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    windows: tuple[int | None, ...]
    softcap: float | None = None

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """The shape of a transformers config of a supported architecture."""
        model_type = config.model_type
        check_architecture(model_type)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        scale_field = ARCHITECTURES[model_type]
        scaling = (getattr(config, scale_field) if scale_field else head_dim) ** -0.5
        shape = cls(
            model_type=model_type,
            n_layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            scaling=scaling,
            windows=_layer_windows(config),
            softcap=getattr(config, "attn_logit_softcapping", None),
        )
        if shape.softcap is not None:
            raise KvsimError(f"{model_type} model uses attention soft-capping ({shape.softcap}), which kvsim does not apply")
        return shape

    @classmethod
    def from_json(cls, data: dict) -> ModelShape:
        try:
            return cls(**{**data, "windows": tuple(data["windows"])})
        except (KeyError, TypeError) as err:
            raise KvsimError(f"malformed model shape {data} ({err}): re-capture or re-export") from err

    @classmethod
    def from_stored(cls, model: dict) -> ModelShape:
        """The shape under the "model" entry of a TraceSet's metadata or an export."""
        return cls.from_json(model["shape"]) if "shape" in model else cls.from_model_fields(model)

    @classmethod
    def from_model_fields(cls, model: dict) -> ModelShape:
        """The shape of a TraceSet (format 2) or export (version 1) written before shapes were stored: those
        captures ran every layer as full attention with the 1/sqrt(head_dim) scale."""
        try:
            head_dim = model["head_dim"]
            return cls(
                model_type=model.get("model_type", "unknown"),
                n_layers=model["n_layers"],
                heads=model["heads"],
                kv_heads=model["kv_heads"],
                head_dim=head_dim,
                scaling=head_dim**-0.5,
                windows=(None,) * model["n_layers"],
            )
        except KeyError as err:
            raise KvsimError(f"model fields {sorted(model)} lack {err}: re-capture or re-export") from err

    def to_json(self) -> dict:
        return {**asdict(self), "windows": list(self.windows)}

    def kind(self, layer: int) -> str:
        return FULL if self.windows[layer] is None else SLIDING

    @property
    def policy_layers(self) -> tuple[int, ...]:
        """The layers a policy compresses (full attention), in model order."""
        return tuple(layer for layer, window in enumerate(self.windows) if window is None)

    def describe(self) -> str:
        """One line for summaries: '18 layers (3 full, 15 sliding 512), 4 heads / 1 KV heads × 256'."""
        sliding = sorted({window for window in self.windows if window is not None})
        kinds = "" if not sliding else (
            f" ({len(self.policy_layers)} full, {self.n_layers - len(self.policy_layers)} sliding "
            + "/".join(map(str, sliding)) + ")"
        )
        return f"{self.n_layers} layers{kinds}, {self.heads} heads / {self.kv_heads} KV heads × {self.head_dim}"

    def check_same(self, other: ModelShape, name: str) -> None:
        """Refuse a policy or trace tuned for one architecture on another."""
        for field in ("n_layers", "heads", "kv_heads", "head_dim", "windows"):
            if getattr(self, field) != getattr(other, field):
                raise KvsimError(
                    f"this policy was tuned for {name} ({field} = {getattr(self, field)}) but the model has "
                    f"{field} = {getattr(other, field)}: export a policy for this model"
                )


def _layer_windows(config) -> tuple[int | None, ...]:
    """Per layer, the sliding window or None, the way transformers builds each layer's mask:
    `layer_types` where the config has them (Gemma 3, Qwen 2/3), else every layer sliding when
    `sliding_window` is set (Mistral, Phi-3: `create_sliding_window_causal_mask`)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return tuple(window if kind == "sliding_attention" and window else None for kind in types)
    return (window,) * config.num_hidden_layers

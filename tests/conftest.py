"""Shared fixtures: the bundled model (cached after its first dequantization) and tiny random models."""

from __future__ import annotations

import os

# Triton kernels run in Triton's CPU interpreter when there is no GPU (test_kernels_triton.py). The
# switch is read when triton's own functions are decorated, at its import, and transformers imports
# triton whenever it is installed: so it is set here, before anything else is imported. Nothing
# else in the tests runs triton code.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kvsim.traces.models import DEFAULT_MODEL, LoadedModel, ModelSource, load_model, load_tokenizer  # noqa: E402

def tiny(model_class, config_class, **shape):
    """A builder of a random-weight `model_class` with the given shape, for a vocabulary size."""
    common = {"max_position_embeddings": 4096, "tie_word_embeddings": True}
    return lambda vocab: model_class(config_class(vocab_size=vocab, **common, **shape))


# Tiny shapes of every supported architecture (`kvsim.shape.ARCHITECTURES`), with different GQA
# group sizes and head dims so layout bugs show. Mistral slides every layer over 48 tokens; Gemma 3
# alternates sliding and full layers and scales by query_pre_attn_scalar (not head_dim), as the real
# ones do, so a prompt of a few hundred tokens crosses every window.
TINY_CONFIGS = {
    "llama": tiny(LlamaForCausalLM, LlamaConfig, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2),
    "qwen2": tiny(Qwen2ForCausalLM, Qwen2Config, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1),
    "qwen3": tiny(Qwen3ForCausalLM, Qwen3Config, hidden_size=48, intermediate_size=96, num_hidden_layers=2, head_dim=24,
                  num_attention_heads=4, num_key_value_heads=2),
    "phi3": tiny(Phi3ForCausalLM, Phi3Config, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=2),
    "mistral": tiny(MistralForCausalLM, MistralConfig, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=48),
    "gemma3_text": tiny(Gemma3ForCausalLM, Gemma3TextConfig, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24,
                        sliding_window=48,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
}


@pytest.fixture(scope="session")
def bundled_tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def bundled_model() -> LoadedModel:
    return load_model(DEFAULT_MODEL)


def build_tiny_model(arch: str, tokenizer) -> LoadedModel:
    """A random-weight model of `arch` that shares the bundled tokenizer (and its chat template)."""
    torch.manual_seed(0)
    model = TINY_CONFIGS[arch](len(tokenizer)).eval()
    return LoadedModel(model, tokenizer, ModelSource(f"tiny-{arch}", "local", "<memory>"))


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_any_model(request, bundled_tokenizer) -> LoadedModel:
    """Every supported architecture, sliding-window ones included."""
    return build_tiny_model(request.param, bundled_tokenizer)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, bundled_tokenizer) -> LoadedModel:
    """The full-attention architectures, for tests whose reference is one attention mask for every layer."""
    return build_tiny_model(request.param, bundled_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(bundled_tokenizer) -> LoadedModel:
    return build_tiny_model("llama", bundled_tokenizer)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_llama):
    """The tiny model saved as a Hugging Face folder, the way a user passes a local model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    return folder

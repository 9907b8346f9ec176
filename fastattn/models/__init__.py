"""Reference models built on the public fastattn API: an encoder (BERT-like), a decoder (GPT-like)
and an encoder-decoder (the original Transformer), with KV-cache generation.

    from fastattn.models import ModelConfig, Decoder
    model = Decoder(ModelConfig.preset("small", attn_backend="triton"))
"""

from fastattn.models.config import PRESETS, ModelConfig
from fastattn.models.decoder import Decoder
from fastattn.models.encoder import Encoder
from fastattn.models.encoder_decoder import EncoderDecoder
from fastattn.models.generation import pad_left, pad_right, sample
from fastattn.models.kv_cache import KVCache
from fastattn.models.layers import MultiHeadAttention, set_attn_backend

__all__ = ["PRESETS", "ModelConfig", "Decoder", "Encoder", "EncoderDecoder", "KVCache", "MultiHeadAttention",
           "pad_left", "pad_right", "sample", "set_attn_backend"]

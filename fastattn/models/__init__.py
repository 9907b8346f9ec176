"""Reference models built on the public fastattn API: an encoder (BERT-like), a decoder (GPT-like)
and an encoder-decoder (the original Transformer), with KV-cache generation. Any of them takes T5's
relative position bias instead of learned positions with ``positions="relative"`` (the "t5-*" presets).

    from fastattn.models import ModelConfig, Decoder, EncoderDecoder
    model = Decoder(ModelConfig.preset("small", attn_backend="triton"))
    t5 = EncoderDecoder(ModelConfig.preset("t5-tiny"))
"""

from fastattn.models.config import PRESETS, ModelConfig
from fastattn.models.decoder import Decoder
from fastattn.models.encoder import Encoder
from fastattn.models.encoder_decoder import EncoderDecoder
from fastattn.models.generation import pad_left, pad_right, sample
from fastattn.models.kv_cache import KVCache
from fastattn.models.layers import MultiHeadAttention, set_attn_backend, set_context_parallel
from fastattn.models.relative_position import RelativePositionBias, relative_position_bucket

__all__ = ["PRESETS", "ModelConfig", "Decoder", "Encoder", "EncoderDecoder", "KVCache", "MultiHeadAttention",
           "RelativePositionBias", "pad_left", "pad_right", "relative_position_bucket", "sample", "set_attn_backend",
           "set_context_parallel"]

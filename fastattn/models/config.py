"""One small config for the three reference models, with named presets."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None  # < n_heads: grouped-query attention (GQA); 1: multi-query (MQA)
    n_layers: int = 2  # encoder layers, or decoder layers of a decoder-only model
    n_decoder_layers: int | None = None  # encoder-decoder only; default n_layers
    d_ff: int | None = None  # feed-forward width; default 4 * d_model
    max_len: int = 256  # longest sequence
    positions: str = "learned"  # "learned": absolute embeddings; "relative": T5's bucketed attention bias
    num_buckets: int = 32  # relative: buckets per stack (split between both directions in an encoder)
    max_distance: int = 128  # relative: farther distances share the last bucket
    pad_id: int = 0
    attn_backend: str = "auto"  # "auto", "triton", "cuda", "torch" or "reference"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_len", "n_kv_heads", "n_decoder_layers",
                     "d_ff", "num_buckets", "max_distance"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= self.pad_id < self.vocab_size:  # (fed back to the model after eos: an embedding index)
            raise ValueError(f"pad_id must be a token id in [0, vocab_size={self.vocab_size}), got {self.pad_id}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.positions not in ("learned", "relative"):
            raise ValueError(f"positions must be 'learned' or 'relative', got {self.positions!r}")
        # An encoder's half of the buckets needs one exact bucket; a decoder's exact range (num_buckets // 2)
        # must end before max_distance for the log-spaced buckets to exist.
        if self.positions == "relative" and (self.num_buckets < 4 or self.max_distance <= self.num_buckets // 2):
            raise ValueError(f"relative positions need num_buckets >= 4 and max_distance > num_buckets // 2, got "
                             f"num_buckets={self.num_buckets}, max_distance={self.max_distance}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named size (see PRESETS) with any field overridden, e.g. preset("small", vocab_size=64)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    # Tests: a few thousand parameters, fast through the Triton interpreter.
    "tiny": ModelConfig(vocab_size=32, d_model=32, n_heads=2, n_layers=2, max_len=64),
    # "tiny" with T5's relative position bias; few buckets, so test-sized sequences (about 20
    # tokens) reach the log-spaced buckets and the last one, shared by all farther distances.
    "t5-tiny": ModelConfig(vocab_size=32, d_model=32, n_heads=2, n_layers=2, max_len=64, positions="relative",
                           num_buckets=8, max_distance=16),
    # The CPU demo: trains in well under a minute per task.
    "small": ModelConfig(vocab_size=64, d_model=128, n_heads=4, n_layers=2, max_len=64),
    # Benchmarks on a GPU: head dim 64 and 128 as in the kernel benchmarks.
    "base": ModelConfig(vocab_size=32000, d_model=768, n_heads=12, n_layers=12, max_len=2048),
    # T5-base's size with T5's 32 buckets up to distance 128: the relative-bias path at benchmark scale.
    "t5-base": ModelConfig(vocab_size=32128, d_model=768, n_heads=12, n_layers=12, max_len=2048, positions="relative"),
    "large-gqa": ModelConfig(vocab_size=32000, d_model=2048, n_heads=16, n_kv_heads=4, n_layers=16, max_len=4096),
}

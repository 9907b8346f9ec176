"""The cross-attention alignment picture: which source words each generated character looked at."""

from __future__ import annotations

from pathlib import Path

import torch


def save_alignment(probs: torch.Tensor, source: list[str], generated: list[str], path: Path, title: str) -> bool:
    """probs (S_tgt, S_src) -> a heat map PNG at path. Returns False (and says why) when matplotlib
    is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"  (matplotlib is not installed: {path.name} not written; pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(0.55 * len(source) + 2.5, 0.4 * len(generated) + 2))
    image = ax.imshow(probs.float().cpu().numpy(), cmap="viridis", vmin=0.0, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.05, label="attention weight")
    ax.set_xticks(range(len(source)), source, rotation=45, ha="right")
    ax.set_yticks(range(len(generated)), generated)
    ax.set_xlabel("source token (encoder)")
    ax.set_ylabel("generated token (decoder)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

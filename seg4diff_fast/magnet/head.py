"""The authors' small conv head on the expert layer's maps: 3×3 convs 1→64→64→1, added as a residual.

Trained with the LoRA and saved beside it (``magnet_head.safetensors``); zero-shot use reads the maps
without it. Where it sits and how it starts depends on the protocol (docs/PAPER_PROTOCOL_MAGNET.md):

- ``protocol="corrected"`` (``MapHead()``): on each prediction (a class's token mean), the last conv
  zero-initialised, so an untrained head is the identity and training starts from the model's own maps;
- ``protocol="paper"`` (``MapHead(zero_init=False)``): on every token map before the class mean (every
  candidate for SA-1B), PyTorch's default init, as ``AttentionScoreLayer`` in the authors'
  ``seg4diff_model_train.py`` (whose training forward adds the input back: ``residual + _outputs``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MapHead"]


class MapHead(nn.Module):
    """``x + conv(relu(conv(relu(conv(x)))))`` on single-channel maps, any leading shape.

    Args:
        width: channels of the hidden convs (64).
        zero_init: start the last conv at zero (the identity); False keeps PyTorch's default init (the
            authors').

    Example:
        >>> import torch
        >>> head = MapHead()
        >>> x = torch.randn(5, 8, 8)
        >>> bool(torch.equal(head(x), x))  # zero-initialised residual
        True
        >>> bool(torch.equal(MapHead(zero_init=False)(x), x))
        False
    """

    def __init__(self, width: int = 64, zero_init: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 3, padding=1),
        )
        if zero_init:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
        x = maps.reshape(-1, 1, h, w)
        return (x + self.net(x.to(self.net[0].weight.dtype)).to(x.dtype)).reshape(*lead, h, w)

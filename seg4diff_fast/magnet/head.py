"""The authors' small conv head on the expert layer's maps: 3×3 convs 1→64→64→1, added as a residual.

Trained with the LoRA and saved beside it (``magnet_head.safetensors``, :func:`~.lora.load_magnet_head`);
segmentation reads the maps without it unless given ``Seg4DiffSegmenter(map_head=head.reader(protocol))``.
Where it sits and how it starts depends on the protocol (docs/PAPER_PROTOCOL_MAGNET.md):

- ``protocol="corrected"`` (``MapHead()``): on each prediction (a class's token mean), the last conv
  zero-initialised, so an untrained head is the identity and training starts from the model's own maps;
- ``protocol="paper"`` (``MapHead(zero_init=False)``): on every token map before the class mean (every
  candidate for SA-1B), PyTorch's default init, as ``AttentionScoreLayer`` in the authors'
  ``seg4diff_model_train.py`` (whose training forward adds the input back: ``residual + _outputs``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MapHead", "inverted_head_message"]


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

    def reader(self, protocol: str = "paper") -> Callable[[torch.Tensor], torch.Tensor]:
        """The head as segmentation reads it: a function of one layer's token maps (T, h, w), for
        ``Seg4DiffSegmenter(map_head=...)``.

        - ``"paper"``: as the authors' evaluation model applies it (``seg4diff_model_ovss.py``): the convs
          alone, no residual, over the maps arranged as one 2-D array of (h·w flattened pixels × T tokens) —
          so the kernel runs along the pixel index and the token index, not over the image grid;
        - ``"corrected"``: as it is trained (``forward``): each token map on its own grid, with the residual.

        Example:
            >>> import torch
            >>> head = MapHead(zero_init=False)
            >>> head.reader("paper")(torch.rand(5, 4, 4)).shape
            torch.Size([5, 4, 4])
        """
        if protocol not in ("paper", "corrected"):
            raise ValueError(f"protocol must be 'paper' or 'corrected', got {protocol!r}")

        @torch.no_grad()
        def read(maps: torch.Tensor) -> torch.Tensor:
            if protocol == "corrected":
                return self(maps)
            t, h, w = maps.shape
            grid = maps.reshape(t, h * w).T[None, None]  # (1, 1, pixels, tokens)
            out = self.net(grid.to(self.net[0].weight.dtype)).to(maps.dtype)
            return out[0, 0].T.reshape(t, h, w)

        return read

    @torch.no_grad()
    def polarity(self, size: int = 16) -> float:
        """How the trained head passes a region on: its output at the centre of a unit square bump (a quarter of
        a ``size``² map, zeros elsewhere) minus its output in the far corner. Positive: a high region stays high.
        Negative: the head inverts its input, so the mask loss may have trained the raw maps to the opposite sign,
        and segmentation without the head (as ``segment``, ``eval --lora`` and a stock ``load_lora_weights`` read
        them) worse than before training (it did on weak blocks; on the textured world's expert block a head at
        −0.77 left raw maps far better): measure, and train with ``conv_head=False`` if they got worse.

        Example:
            >>> MapHead().polarity()  # the zero-initialised head is the identity
            1.0
        """
        x = torch.zeros(1, size, size, dtype=self.net[0].weight.dtype, device=self.net[0].weight.device)
        q = size // 4
        x[0, q:size - q, q:size - q] = 1.0
        y = self(x)[0]
        return round(float(y[size // 2, size // 2] - y[0, 0]), 4)


def inverted_head_message(polarity: float) -> str:
    """What to tell a user whose trained head has a negative :meth:`MapHead.polarity` (one line)."""
    return (f"the trained conv head inverts its input (polarity {polarity:.3f}): the mask loss may have been met "
            "through the head with raw maps of the opposite sign, and segmentation reads the raw maps; measure the "
            "layer with the LoRA (eval --lora) and, if it got worse, train again with conv_head=False (--no-conv-head)")

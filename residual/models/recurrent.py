"""A GNMT-style residual LSTM stack (Wu et al. 2016): residual connections between layers.

>>> import torch
>>> lstm = ResidualLSTM(16, 32, num_layers=3)
>>> out, (h, c) = lstm(torch.randn(2, 9, 16))
>>> out.shape, h.shape
(torch.Size([2, 9, 32]), torch.Size([3, 2, 32]))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual._types import check_positive_int
from residual.core import Residual
from residual.drop import apply_drop_schedule, check_drop_rate
from residual.errors import ResidualError

__all__ = ["ResidualLSTM"]


class ResidualLSTM(nn.Module):
    """Stacked single-layer LSTMs; layer ``i >= residual_from`` is a ``Residual(nn.LSTM)``.

    GNMT adds residual connections from the third layer on (``residual_from=2``) and makes the
    first layer bidirectional (``bidirectional_first=True``; its two directions are concatenated
    and the second layer maps ``2 * hidden_size`` back to ``hidden_size``). Layer 0 can only be
    residual when ``input_size == hidden_size`` and it is unidirectional.

    Returns ``(output, (h_n, c_n))`` as ``nn.LSTM`` does: ``h_n`` / ``c_n`` stack each layer's
    final states in order, shape (num_layers [+1 for the bidirectional first layer], N, H). The
    initial state ``hx``, if given, has that layout too.

    Args:
        input_size, hidden_size, num_layers: as ``nn.LSTM``.
        residual_from: first layer (0-based) with a residual connection.
        bidirectional_first: GNMT's bidirectional bottom layer.
        dropout: dropout on each layer's output except the last (as ``nn.LSTM``).
        batch_first: (N, L, H) when True (default), (L, N, H) otherwise.
        drop_path: stochastic depth rate of the deepest residual layer, decayed linearly to the
            first residual one; per-sample ("row") only, since an LSTM returns its states too.

    Dynamo does not compile ``nn.LSTM`` without graph breaks (``fullgraph=True`` fails by
    design); use it eagerly or with ``fullgraph=False``.

    >>> import torch
    >>> gnmt = ResidualLSTM(16, 32, num_layers=4, residual_from=2, bidirectional_first=True)
    >>> [type(layer).__name__ for layer in gnmt.layers]
    ['LSTM', 'LSTM', 'Residual', 'Residual']
    >>> out, (h, c) = gnmt(torch.randn(2, 9, 16))
    >>> out.shape, h.shape  # 4 layers + 1 for the second direction of the first
    (torch.Size([2, 9, 32]), torch.Size([5, 2, 32]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 4,
        *,
        residual_from: int = 1,
        bidirectional_first: bool = False,
        dropout: float = 0.0,
        batch_first: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        name = "ResidualLSTM"
        check_positive_int(name, "input_size", input_size)
        check_positive_int(name, "hidden_size", hidden_size)
        check_positive_int(name, "num_layers", num_layers)
        if residual_from < 0:
            raise ResidualError(f"{name}: residual_from must be >= 0, got {residual_from}")
        if check_drop_rate(name, drop_path) and residual_from >= num_layers:
            raise ResidualError(
                f"{name}: drop_path={drop_path} needs a residual layer, but residual_from="
                f"{residual_from} >= num_layers={num_layers}; lower residual_from or drop_path=0"
            )
        if residual_from == 0 and (input_size != hidden_size or bidirectional_first):
            raise ResidualError(
                f"{name}: layer 0 maps {input_size} -> "
                f"{hidden_size * (2 if bidirectional_first else 1)} features and cannot be "
                "residual; use residual_from >= 1"
            )
        if bidirectional_first and residual_from == 1 and num_layers > 1:
            raise ResidualError(
                f"{name}: layer 1 maps the bidirectional layer's {2 * hidden_size} features to "
                f"{hidden_size} and cannot be residual; use residual_from >= 2 (as GNMT)"
            )
        self.hidden_size, self.batch_first = hidden_size, batch_first
        self.bidirectional_first = bidirectional_first
        layers: list[nn.Module] = []
        features = input_size
        for i in range(num_layers):
            bidirectional = bidirectional_first and i == 0
            lstm = nn.LSTM(
                features, hidden_size, batch_first=batch_first, bidirectional=bidirectional
            )
            layers.append(Residual(lstm) if i >= residual_from else lstm)
            features = hidden_size * (2 if bidirectional else 1)
        self.layers = nn.ModuleList(layers)
        self.dropout = nn.Dropout(dropout)
        if drop_path:
            apply_drop_schedule(self.layers, drop_path, "row")

    def forward(
        self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        states_h: list[Tensor] = []
        states_c: list[Tensor] = []
        offset = 0
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            width = 2 if self.bidirectional_first and i == 0 else 1
            x, (h, c) = layer(x, _layer_state(hx, offset, width))
            offset += width
            states_h.append(h)
            states_c.append(c)
            if i != last:
                x = self.dropout(x)
        return x, (torch.cat(states_h), torch.cat(states_c))


def _layer_state(
    hx: tuple[Tensor, Tensor] | None, offset: int, width: int
) -> tuple[Tensor, Tensor] | None:
    """One layer's slice ``[offset, offset + width)`` of the stacked initial state, or None.

    An FX leaf: ``hx`` is optional, so whether it is given is known only when a traced graph
    runs (``nn.LSTM`` takes None for a zero state).
    """
    if hx is None:
        return None
    return hx[0][offset : offset + width], hx[1][offset : offset + width]


torch.fx.wrap("_layer_state")

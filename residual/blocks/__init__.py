"""Residual blocks: builders that return :class:`~residual.Residual` instances."""

from residual.blocks.conv import Bottleneck, PreActBlock, ResidualBlock

__all__ = ["Bottleneck", "PreActBlock", "ResidualBlock"]

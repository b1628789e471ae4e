"""HSTU (arXiv 2402.17152) building blocks: jagged pointwise attention and the HSTU layer."""

from models.hstu.attention import hstu_attention

__all__ = ["hstu_attention"]

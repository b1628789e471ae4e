"""HSTU (arXiv 2402.17152) building blocks: jagged pointwise attention and the HSTU layer."""

from models.hstu.attention import hstu_attention
from models.hstu.layer import HSTULayer

__all__ = ["HSTULayer", "hstu_attention"]

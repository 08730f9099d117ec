"""Learnable and frozen input transforms (FlatQuant's Kronecker affine transforms)."""
from .kronecker import KroneckerTransform, inverse_transpose, kron_apply
from .learnable import HeadOutputTransform, LearnableFactor, LearnableKronecker

__all__ = ["HeadOutputTransform", "KroneckerTransform", "LearnableFactor", "LearnableKronecker", "inverse_transpose", "kron_apply"]

"""The Philox stream"s math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.random`.

Every function is the reference"s own: it already generates whole offset tensors at once.
"""

from __future__ import annotations

from memzoo.reference.random import (
    check_seed_offsets,
    normal_pairs_from_words,
    normals_from_words,
    philox_randn,
    philox_words,
    philox_words4,
)

__all__ = ["check_seed_offsets", "normal_pairs_from_words", "normals_from_words", "philox_randn", "philox_words", "philox_words4"]

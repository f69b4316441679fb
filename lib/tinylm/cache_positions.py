"""The bookkeeping every KV cache shares: which positions are filled, which hold real tokens.

The torch model (`tinylm.attention.KVCache`), the NumPy runtime and the ONNX Runtime runner
each store keys and values their own way, but they track positions and left padding the
same way, through this one class. Its `mask` may be a torch tensor or a NumPy array (both
slice and assign alike), so this module imports neither.
"""

from __future__ import annotations

from typing import Any


class CachePositions:
    """Positions 0 .. pos-1 are filled; mask [batch_size, max_len] marks real tokens.

    A subclass sets `mask` to an all-False bool array or tensor of shape [batch_size,
    max_len] in its __init__ (after calling this one). Each forward calls `record_tokens`
    before its layers run and `advance` after them.
    """

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.pos = 0
        self.has_padding = False  # lets the unpadded path skip building masks
        self.mask: Any = None

    def record_tokens(self, pad_mask: Any, T: int) -> Any:
        """Mark positions pos .. pos+T-1 (pad_mask [B, T], True = real; None = all real).

        Returns the validity of every position so far, mask[:, :pos+T], or None while no
        padding has been seen (so plain causal attention is right).
        """
        pos = self.pos
        self.mask[:, pos : pos + T] = True if pad_mask is None else pad_mask
        self.has_padding |= pad_mask is not None and not bool(pad_mask.all())
        return self.mask[:, : pos + T] if self.has_padding else None

    def advance(self, n: int) -> None:
        """Mark n more positions as filled (after every layer has written them)."""
        self.pos += n

    def reset(self) -> None:
        """Forget the contents (keeps the allocation for the next prompt)."""
        self.pos, self.has_padding = 0, False
        self.mask[:] = False

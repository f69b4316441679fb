"""Small seeded models shared by the port tests (ONNX and NumPy runtimes)."""

from __future__ import annotations

import numpy as np
import torch

from tinylm.model import GPT, GPTConfig

TINY = dict(vocab_size=97, context_length=48, n_layer=2, n_head=4, n_embd=32)


def make_model(config: dict, seed: int = 0) -> GPT:
    """A GPT with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**config)).eval()


def torch_logits(model: GPT, ids: np.ndarray) -> np.ndarray:
    """The reference logits a port must reproduce."""
    with torch.inference_mode():
        return model(torch.as_tensor(ids)).numpy()

"""Porting tinylm off PyTorch: ONNX export + ONNX Runtime, a NumPy-only runtime, parity reports.

The story of chapter 07: a model trained with one vendor's stack must run on another
vendor's accelerator with a different software stack, and nobody trusts the port until the
numbers match. Three pieces:

- `tinylm.port.onnx`: `export_onnx(model, path)` writes one ONNX graph whose KV cache is an
  explicit input/output (prefill = an empty past, decode = one token), and `OnnxLM(path)`
  runs it in ONNX Runtime. The same file runs on other accelerators by choosing an execution
  provider (`providers=["CUDAExecutionProvider"]`, `["CANNExecutionProvider"]`, ...).
- `tinylm.port.numpy_runtime`: `NumpyLM.load(checkpoint_dir)` runs the model with nothing
  but NumPy (no torch import at all), in float32 or with int8 weights.
- `tinylm.port.parity`: `compare(model, port, prompts)` checks a port layer by layer against
  the PyTorch model and names the first layer that breaks.

This package's __init__ imports nothing heavy (in particular not torch), so that
`import tinylm.port.numpy_runtime` stays torch-free; the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule that defines it; resolved lazily by __getattr__ (PEP 562).
_EXPORTS = {
    "NumpyLM": "numpy_runtime",
    "export_onnx": "onnx_export",
    "OnnxLM": "onnx",
    "compare": "parity",
    "ParityReport": "parity",
    "make_broken_port": "parity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"tinylm.port.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'tinylm.port' has no attribute {name!r}")

"""tinylm: the shared helpers of the tinylm workbook (one module per stage).

The LLM, bottom up: config, layers, attention, moe, model; tokenizer, data + stories; train +
recipes; checkpoint; generate; quant/ (formats, round-to-nearest, calibration, whole models);
port/ (ONNX, NumPy runtime, parity). Measuring and projecting: profile, hardware, costs,
distributed. The course machinery lives apart in course/ (classroom, exercises, widgets,
plots, run_notebooks). Modules that moved stay importable under their old names (`_moved`).
"""

from tinylm import _moved

__version__ = "0.1.0"

_moved.install()

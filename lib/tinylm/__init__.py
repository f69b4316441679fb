"""tinylm: the shared helpers of the tinylm workbook (one module per stage)."""

__version__ = "0.1.0"

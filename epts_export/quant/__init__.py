"""INT8 (W8A8) levels: the arithmetic (``math``), the per-level recipe of ranges and smoothing
(``recipe``), the ONNX graph's Q/DQ placement (``qdq``) and its PyTorch reference (``fake``)."""

"""TensorRT: ``builder`` (device side: engine specs, the Python-API builder and its CLI; ships in
bundles with ``sparse``, the sparse-tactic report), ``scripts`` (host side: trtexec commands and
a bundle's build scripts), ``refit`` (which levels share one refittable engine, and the ONNX
weights that switch it) and ``runtime`` (TrtDecoder). Imports nothing, so that a bundle's copy of
``epts_export.trt.builder`` loads without the rest of the package."""

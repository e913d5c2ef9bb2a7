"""`moecc bench`'s tooling: the grid of layers timed (grid.py), the alternatives built on the same weights
(alternatives.py: onnxruntime's fused op, transformers' blocks, moecc's TVM kernels) and the report
(report.py). It measures the backends; no backend imports it."""

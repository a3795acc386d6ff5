"""The torch backends of the fused ops: each op's algorithm in vectorized PyTorch (CPU, and any device without
Triton), one module per op, named after the op."""

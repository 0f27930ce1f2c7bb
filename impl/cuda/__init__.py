"""CUDA TT-EmbeddingBag kernels (impl/cuda/*.cu), their launch arithmetic and their CuPy loader.

``launch`` is plain Python; ``loader`` imports CuPy only when a kernel is first launched, so
importing this package never needs CuPy or a GPU. See README.md beside this file.
"""

"""Native CPU TT-EmbeddingBag kernel: C++ source (tt_cpu.cpp), its build cache and its ops."""

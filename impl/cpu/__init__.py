"""Native CPU TT-EmbeddingBag kernel: C++ source (tt_cpu.cpp and the headers it includes), its build cache and its ops."""

"""memzoo-bench: microbenchmarks of memzoo kernels and optimizer steps (``python -m memzoo.bench``)."""

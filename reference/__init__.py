"""Pure-PyTorch math of every memzoo algorithm: small functions on tensors, no state.

These are the truth that :mod:`memzoo.triton_kernels` is tested against. Each function has the
same name, signature and in-place semantics as its kernel twin (a trailing ``_`` mutates the
declared outputs and nothing else).
"""

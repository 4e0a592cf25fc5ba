"""The ``"torch"`` backend: fast pure-PyTorch twins of :mod:`memzoo.reference`, one module per
family, with the same names, signatures and in-place semantics as the reference functions and the
Triton kernels beside them (``memzoo.triton_kernels.<family>``).

Where this sits: the top level of the package is fixed (``optim``, ``reference``,
``triton_kernels``, ``bench``); ``reference/`` is the clarity-first truth and stays per-tensor,
and these functions are, like the kernels, an optimized implementation held to it by the same
record-driven tests (tests/test_kernels.py over :mod:`memzoo.bench.kernel_cases`), so they sit
beside the kernels. The
subpackage is not called ``torch`` so that it can never shadow PyTorch. Nothing here imports
Triton: the ``"torch"`` backend runs on every device PyTorch supports.

How they are fast: multi-tensor passes over chunks of each tensor's memory (the temporaries of a
chunk stay in cache, so each element is read and written about once from memory, as a fused
kernel would), batched matrix products over same-shape matrices, no full-size temporaries. A
function that a family has not rewritten is the reference's own (listed in each module).
"""

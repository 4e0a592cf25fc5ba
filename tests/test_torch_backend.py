"""The "torch" backend's chunked passes: chunk boundaries, non-finite values, the dispatch rule.

The registry suite (tests/test_kernels.py, tests/test_optimizers.py) holds every torch twin to
the reference on small tensors; these tests make tensors span several chunks (a small CHUNK) and
put NaN/Inf in some chunks only.
"""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch
from support import assert_close

from memzoo.optim.base import resolve_backend
from memzoo.reference import galore as reference_galore
from memzoo.reference import lion as reference_lion
from memzoo.triton_kernels.torch_backend import compiled, elementwise
from memzoo.triton_kernels.torch_backend import galore as torch_galore
from memzoo.triton_kernels.torch_backend import lion as torch_lion

SHAPES = [(300,), (17, 33), (5, 1, 7)]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(elementwise, "CHUNK", 64)


def _tensors(dtype, seed, count, transposed=False):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        group = [torch.randn(s, generator=generator).to(dtype) for s in SHAPES]
        if transposed:  # dense but not contiguous: chunks follow memory order
            group[1] = torch.randn(33, 17, generator=generator).to(dtype).t()
        out.append(group)
    return out


def _assert_same_outputs(actual, expected):
    for a_list, e_list in zip(actual, expected):
        for a, e in zip(a_list, e_list):
            assert torch.equal(a.isnan(), e.isnan())  # NaN exactly where the reference has it
            finite = ~e.isnan()
            assert_close(a[finite], e[finite], what="output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poison", [None, "nan_grad", "inf_grad", "inf_momentum"])
def test_lion_chunks_match_the_reference(small_chunks, dtype, poison) -> None:
    params, grads, exp_avgs = _tensors(dtype, 0, 3, transposed=True)
    if poison == "nan_grad":
        grads[0][70] = float("nan")  # second chunk of the first tensor
    elif poison == "inf_grad":
        grads[1][3, 4] = float("-inf")
    elif poison == "inf_momentum":
        exp_avgs[2].view(-1)[1] = float("inf")
        grads[2].view(-1)[1] = float("inf")
    expected = [[t.clone() for t in ts] for ts in (params, exp_avgs)]
    hparams = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=True)
    reference_lion.lion_update_(expected[0], grads, expected[1], **hparams)
    torch_lion.lion_update_(params, grads, exp_avgs, **hparams)
    _assert_same_outputs((params, exp_avgs), expected)


@pytest.mark.parametrize("decay_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_chunks_match_the_reference(small_chunks, dtype, decay_first) -> None:
    params, grads, exp_avgs, exp_avg_sqs = _tensors(dtype, 1, 4, transposed=True)
    exp_avg_sqs = [v.abs() for v in exp_avg_sqs]
    grads[0][100] = float("inf")
    expected = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)]
    hparams = dict(step_size=0.01, beta1=0.9, beta2=0.999, eps=1e-6, lr=0.01, weight_decay=0.1,
                   decay_first=decay_first)
    reference_galore.adamw_update_(expected[0], grads, expected[1], expected[2], **hparams)
    torch_galore.adamw_update_(params, grads, exp_avgs, exp_avg_sqs, **hparams)
    _assert_same_outputs((params, exp_avgs, exp_avg_sqs), expected)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_projected_adam_chunks_match_the_reference(small_chunks, state_dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    grads = [torch.randn(40, 30, generator=generator), torch.randn(9, 50, generator=generator)]
    rights = [torch.linalg.qr(torch.randn(g.shape[1], 7, generator=generator))[0].T.contiguous() for g in grads]
    moments = [[torch.randn(g.shape[0], 7, generator=generator).to(state_dtype) for g in grads] for _ in range(2)]
    moments[1] = [v.abs() for v in moments[1]]
    updates = [torch.empty(g.shape[0], 7, dtype=state_dtype) for g in grads]
    expected = [[t.clone() for t in ts] for ts in (*moments, updates)]
    hparams = dict(lefts=None, rights=rights, beta1=0.9, beta2=0.999, eps=1e-6, maximize=True)
    reference_galore.galore_adam_project_(grads, *expected, **hparams)
    torch_galore.galore_adam_project_(grads, *moments, updates, **hparams)
    for actual, wanted in zip((*moments, updates), expected):
        for a, e in zip(actual, wanted):
            assert_close(a, e, 1e-5 if state_dtype == torch.float32 else 0.0, what="moments")


def test_chunked_pass_needs_no_full_size_temporary(small_chunks) -> None:
    """Updates see chunks of at most CHUNK elements and scratch buffers of that size, whatever
    the tensor size (the reference's temporaries are full-size)."""
    seen = []

    def update(scratch, chunk):
        seen.append((chunk[0].numel(), [b.numel() for b in scratch.buffers]))
        chunk[0].add_(1.0)

    tensor = torch.zeros(300)
    elementwise.for_each_chunk(([tensor],), update, lambda group: None, buffers=2)
    assert [size for size, _ in seen] == [64, 64, 64, 64, 44]
    assert all(buffers == [64, 64] for _, buffers in seen) and torch.equal(tensor, torch.ones(300))
    assert elementwise.chunk_size(torch.device("meta")) == elementwise.DEVICE_CHUNK


def test_backend_dispatch_rule() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("reference", cpu, "lion") is reference_lion
    assert resolve_backend("torch", cpu, "lion") is torch_lion
    assert resolve_backend("auto", cpu, "lion") is torch_lion  # no silent fall back to the slow path
    with pytest.raises(ValueError, match="Invalid backend"):
        resolve_backend("fast", cpu, "lion")


@pytest.mark.parametrize("seed", [0, 12345, 2**32 + 7, 2**63 - 1])
def test_philox_words_equal_the_reference(small_chunks, seed) -> None:
    """The int64 wrap-around products give exactly the reference's words (and so the same
    normals), across chunks and at the counter extremes."""
    from memzoo.reference import random as reference_random
    from memzoo.triton_kernels.torch_backend import random as torch_random

    generator = torch.Generator().manual_seed(seed % 1000)
    offsets = torch.cat([torch.randint(0, 2**62, (200,), generator=generator),
                         torch.tensor([0, 1, 2**32 - 1, 2**32, 2**63 - 1])]).view(5, 41)
    for ours, theirs in zip(torch_random.philox_words4(seed, offsets), reference_random.philox_words4(seed, offsets)):
        assert ours.dtype == theirs.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(torch_random.philox_randn(seed, offsets), reference_random.philox_randn(seed, offsets))
    seeds = torch.tensor([[seed % 2**62], [3]])  # several streams at once
    assert torch.equal(torch_random.philox_randn(seeds, offsets[0]), reference_random.philox_randn(seeds, offsets[0]))
    # A batched refresh's seeds: repeated values, broadcast against a 3-D block of offsets.
    seeds = torch.tensor([seed % 2**62, 3, seed % 2**62, 0]).view(4, 1, 1)
    block = offsets[:2].view(1, 2, 41)
    for ours, theirs in zip(torch_random.philox_words4(seeds, block), reference_random.philox_words4(seeds, block)):
        assert ours.shape == (4, 2, 41) and torch.equal(ours, theirs)
    # Seeds varying along the offsets' last dimension (not one per leading index): grouped by value.
    seeds = torch.tensor([seed % 2**62, 3] * 20 + [0]).view(1, 41)
    for ours, theirs in zip(torch_random.philox_words4(seeds, offsets), reference_random.philox_words4(seeds, offsets)):
        assert ours.shape == (5, 41) and torch.equal(ours, theirs)


def _draw_offsets():
    """A draw longer than one compiled slice whose count (SLICE + 305) is a multiple neither of
    the slice nor of 4, ending at the counter extremes."""
    from memzoo.triton_kernels.torch_backend import random as torch_random

    return torch.cat([torch.arange(7, 7 + torch_random.SLICE + 301), torch.tensor([0, 2**32 - 1, 2**32, 2**63 - 1])])


@pytest.mark.parametrize("policy", ["never", "always"])
def test_philox_draw_compiled_or_chunked_is_the_references_stream(monkeypatch, policy) -> None:
    """The torch backend's philox_randn, in compiled slices (``always``; ``auto`` from
    DRAW_MIN_NUMEL normals) or eager chunks (``never``), gives the reference's normals bit for
    bit: one seed, a batch's seeds (B, 1) in one call, and the random factors APOLLO keeps
    (random_basis with a tensor of seeds, left/right/full, a row shard's rows, fp32 and bf16),
    each exactly what its seed gives alone through the reference. Negative control: offsets
    shifted by one give other numbers, so a draw that moved along the stream would fail."""
    from memzoo.reference import random as reference_random
    from memzoo.reference.projector import random_basis
    from memzoo.triton_kernels.torch_backend import random as torch_random

    monkeypatch.setenv(compiled.COMPILE_ENV, policy)
    monkeypatch.setattr(elementwise, "CHUNK", 4096)  # eager chunks: several, the last one partial
    offsets = _draw_offsets()
    for seed in (0, 2**63 - 2):  # both key words
        drawn = torch_random.philox_randn(seed, offsets)
        assert drawn.dtype == torch.float32 and torch.equal(drawn, reference_random.philox_randn(seed, offsets))
    seeds = torch.tensor([[5], [2**33 + 1], [5]])
    drawn = torch_random.philox_randn(seeds, offsets[:1001])
    assert drawn.shape == (3, 1001) and torch.equal(drawn, reference_random.philox_randn(seeds, offsets[:1001]))
    assert torch.equal(drawn[0], drawn[2]) and not torch.equal(drawn[0], drawn[1])
    assert not torch.equal(torch_random.philox_randn(5, offsets[:1001] + 1), drawn[0])  # the negative control
    seeds = torch.tensor([3, 2**35 + 9])
    for dtype in (torch.float32, torch.bfloat16):
        for shape, side, rows in (((24, 10), "right", None), ((10, 24), "left", None), ((10, 24), "left", range(3, 8)),
                                  ((9, 11), "full", None)):
            batch = random_basis(seeds, shape, 4, side, "cpu", dtype, randn=torch_random.philox_randn, rows=rows)
            for index, seed in enumerate(seeds.tolist()):
                alone = random_basis(seed, shape, 4, side, "cpu", dtype, rows=rows)  # the reference's Philox
                for ours, theirs in zip(batch, alone):
                    assert (ours is None) == (theirs is None)
                    assert ours is None or (ours.dtype == dtype and torch.equal(ours[index], theirs))
    if policy == "always" and torch_random._DRAW.failure is None:
        assert torch_random._DRAW.compiled is not None


def test_philox_draw_falls_back_to_eager_when_compiling_fails(monkeypatch) -> None:
    """No C++ compiler (or any compile error): one RuntimeWarning naming the Philox draw, then
    every draw runs eagerly with the reference's normals. Under ``auto`` only draws of at least
    DRAW_MIN_NUMEL normals compile."""
    from memzoo.reference import random as reference_random
    from memzoo.triton_kernels.torch_backend import random as torch_random

    draw = compiled.CompiledPass(torch_random._DRAW.fn, torch_random._DRAW.name, failure=compiled.CompileFailure(),
                                 min_numel=torch_random.DRAW_MIN_NUMEL)
    monkeypatch.setattr(torch_random, "_DRAW", draw)
    monkeypatch.setenv(compiled.COMPILE_ENV, "auto")
    assert draw.wanted([torch.empty(torch_random.DRAW_MIN_NUMEL)])
    assert not draw.wanted([torch.empty(torch_random.DRAW_MIN_NUMEL - 1)])

    def no_compiler(function, **options):
        def compiled_function(*args):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nc++: not found")
        return compiled_function

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setenv(compiled.COMPILE_ENV, "always")
    offsets = _draw_offsets()
    with pytest.warns(RuntimeWarning, match="torch.compile of the Philox draw failed .*RuntimeError") as caught:
        drawn = [torch_random.philox_randn(seed, offsets) for seed in (1, 2**40)]
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert all(torch.equal(ours, reference_random.philox_randn(seed, offsets)) for ours, seed in zip(drawn, (1, 2**40)))
    assert draw.failure is not None and not draw.wanted([torch.empty(torch_random.DRAW_MIN_NUMEL)])


@pytest.mark.parametrize("decay_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_takes_torchs_fused_kernel_with_the_same_math(monkeypatch, dtype, decay_first) -> None:
    """Contiguous tensors of one dtype go through torch._fused_adamw_, whose bias corrections are
    made exactly 1 (at t = 1e30) so that it computes the reference's HF-Adam step. A mixed-dtype
    or non-contiguous group still takes the chunked pass. Negative control: with
    bias corrections of t = 2 the fused path leaves the reference's tolerance."""
    calls = []
    fused = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda params, *args, **kwargs: (calls.append(len(params)),
                                                                                 fused(params, *args, **kwargs)))
    generator = torch.Generator().manual_seed(3)
    shapes = [(300,), (17, 33), (5, 1, 7)]

    def run(step_field):
        monkeypatch.setattr(torch_galore, "_NO_BIAS_CORRECTION_STEP", step_field)
        params, grads, exp_avgs = ([torch.randn(s, generator=generator).to(dtype) for s in shapes] for _ in range(3))
        exp_avg_sqs = [torch.rand(s, generator=generator).to(dtype) for s in shapes]
        # The chunked pass: a group with fp32 moments of a bf16 weight, or with a transposed weight.
        if dtype == torch.bfloat16:
            exp_avg_sqs[2] = exp_avg_sqs[2].float()
        else:
            params[1] = params[1].T.contiguous().T
        expected = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)]
        hparams = dict(step_size=0.01, beta1=0.9, beta2=0.99, eps=1e-6, lr=0.01, weight_decay=0.1,
                       maximize=True, decay_first=decay_first)
        reference_galore.adamw_update_(expected[0], grads, expected[1], expected[2], **hparams)
        torch_galore.adamw_update_(params, grads, exp_avgs, exp_avg_sqs, **hparams)
        return (params, exp_avgs, exp_avg_sqs), expected

    _assert_same_outputs(*run(torch_galore._NO_BIAS_CORRECTION_STEP))
    # The two other groups, in one call: each as a body of whole 64-element blocks and a padded tail
    # block (float32: (300,) and (5, 1, 7); bfloat16: (300,) and (17, 33)).
    fused_numels = [300, 35] if dtype == torch.float32 else [300, 561]
    assert calls == [sum((n >= 64) + (n % 64 > 0) for n in fused_numels)]
    if dtype == torch.float32:  # (bf16 rounds away the difference of an update of 0.01)
        with pytest.raises(AssertionError):
            _assert_same_outputs(*run(2.0))


@pytest.fixture
def compiled_lion(monkeypatch):
    """The compiled Lion pass on small tensors, with a fresh compilation state."""
    monkeypatch.setenv(compiled.COMPILE_ENV, "always")
    fresh = compiled.CompiledPass(torch_lion._lion_pass, "Lion pass")
    monkeypatch.setattr(torch_lion, "_COMPILED_LION", fresh)
    return fresh


def _cxx_compiler() -> str | None:
    return next(filter(None, map(shutil.which, ("g++", "c++", "clang++", "gcc", "cc"))), None)


@pytest.mark.skipif(_cxx_compiler() is None, reason="no C++ compiler: Inductor cannot compile on the CPU "
                    "(test_compiled_lion_falls_back_and_says_so covers that case)")
def test_compiled_lion_is_the_reference_bit_for_bit(compiled_lion) -> None:
    """One list of float32 and bfloat16 tensors (a transposed one, NaN and ±Inf in places): the
    compiled pass gives the reference's bits, and a new learning rate does not recompile (the
    scalars are tensors, not constants baked into the code)."""
    from torch._dynamo.utils import counters

    params, grads, exp_avgs = (f + b for f, b in zip(_tensors(torch.float32, 1, 3, transposed=True),
                                                     _tensors(torch.bfloat16, 2, 3)))
    grads[0][70] = float("nan")
    grads[4][3, 4] = float("-inf")
    exp_avgs[2].view(-1)[1] = grads[2].view(-1)[1] = float("inf")
    expected = [[t.clone() for t in ts] for ts in (params, exp_avgs)]
    for lr in (0.01, 0.003):
        hparams = dict(lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=True)
        reference_lion.lion_update_(expected[0], grads, expected[1], **hparams)
        torch_lion.lion_update_(params, grads, exp_avgs, **hparams)
        for actual, wanted in zip(params + exp_avgs, expected[0] + expected[1]):
            assert torch.equal(actual.isnan(), wanted.isnan())
            assert torch.equal(actual.nan_to_num(), wanted.nan_to_num())
    assert compiled_lion.compiled is not None and compiled_lion.failure is None
    assert counters["stats"]["unique_graphs"] >= 1
    graphs = counters["stats"]["unique_graphs"]
    torch_lion.lion_update_(params, grads, exp_avgs, lr=0.5, beta1=0.8, beta2=0.9, weight_decay=0.0, maximize=True)
    assert counters["stats"]["unique_graphs"] == graphs  # new hyperparameters: no new graph


def test_compiled_lion_falls_back_and_says_so(compiled_lion, monkeypatch) -> None:
    """Where compiling fails (no C++ compiler, say), the pass warns once and the step is the
    eager path's: nothing lost, nothing applied twice."""
    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return fail

    monkeypatch.setattr(compiled.torch, "compile", no_compiler)
    params, grads, exp_avgs = _tensors(torch.float32, 3, 3)
    expected = [[t.clone() for t in ts] for ts in (params, exp_avgs)]
    hparams = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1)
    reference_lion.lion_update_(expected[0], grads, expected[1], **hparams)
    with pytest.warns(RuntimeWarning, match="torch.compile of the Lion pass failed.*InvalidCxxCompiler"):
        torch_lion.lion_update_(params, grads, exp_avgs, **hparams)
    _assert_same_outputs((params, exp_avgs), expected)
    assert compiled_lion.failure is not None and not compiled_lion.wanted(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the next step neither retries nor warns
        torch_lion.lion_update_(params, grads, exp_avgs, **hparams)


def test_compile_policy_is_checked(monkeypatch) -> None:
    monkeypatch.setenv(compiled.COMPILE_ENV, "sometimes")
    with pytest.raises(ValueError, match="MEMZOO_TORCH_COMPILE='sometimes'"):
        compiled.compile_policy()
    monkeypatch.setenv(compiled.COMPILE_ENV, "auto")
    pass_ = compiled.CompiledPass(torch_lion._lion_pass, "Lion pass")
    small, large = torch.zeros(10), torch.empty(compiled.MIN_NUMEL)
    assert not pass_.wanted([small]) and pass_.wanted([large]) and pass_.wanted([torch.nn.Parameter(large)])
    assert not pass_.wanted([large.to("meta")])
    monkeypatch.setenv(compiled.COMPILE_ENV, "never")
    assert not pass_.wanted([large])


# ---- the compiled zeroth-order pass ----------------------------------------------------------

def _zo_pass_case(generator):
    """Tensors with a whole slice and a tail, a dense transposed one and a small one (the tails
    share one scratch slice), their stream offsets (from 5 chunks on) and mask layout."""
    from memzoo.reference.zeroth_order import CHUNK, MASK_BYTES_PER_CHUNK
    from memzoo.triton_kernels.torch_backend import compiled as compile_policy
    from memzoo.triton_kernels.torch_backend import zeroth_order_compiled as compiled

    params = [torch.randn(compiled.SLICE + 300, generator=generator),
              torch.randn(40, 31, generator=generator).t(), torch.randn(512, generator=generator)]
    chunks = [-(-p.numel() // CHUNK) for p in params]
    starts = [sum(chunks[:index]) for index in range(len(params))]
    mask_bits = torch.randint(0, 256, (sum(chunks) * MASK_BYTES_PER_CHUNK,), generator=generator,
                              dtype=torch.int32).to(torch.uint8)
    return (params, [(5 + start) * CHUNK for start in starts], [start * MASK_BYTES_PER_CHUNK for start in starts],
            mask_bits)


ZO_PASSES = {  # a step's perturbation, an update pass (decay, QZO's clamp), Sparse-MeZO's first pass and update
    "perturb": dict(from_sign=0, to_sign=1),
    "update": dict(from_sign=-1, to_sign=0, coefficients=torch.tensor([2e-2]), decay=0.99, clamp_min=-0.5),
    "mask": dict(from_sign=0, to_sign=1, thresholds=[0.5, 1.0, float("inf")], write_mask=True),
    "masked update": dict(from_sign=1, to_sign=0, coefficients=torch.tensor([2e-2]), decay=0.99,
                          thresholds=[0.5, 1.0, float("inf")], write_mask=False),
}


def _run_zo_passes(function, params, stream_offsets, mask_offsets, mask_bits):
    for name, kwargs in ZO_PASSES.items():
        masks = dict(mask_bits=mask_bits, mask_offsets=mask_offsets) if "thresholds" in kwargs else {}
        function(params, stream_offsets, seed=2**40 + 17, eps=1e-2, **kwargs, **masks)


def test_compiled_zeroth_order_pass_is_bit_identical_to_the_reference(monkeypatch) -> None:
    """With MEMZOO_TORCH_COMPILE=always (auto: from 4M elements) a CPU pass runs compiled slices;
    parameters and mask bits equal the reference's exactly (torch.equal, no tolerance), whole
    slices and gathered tails."""
    from memzoo.reference import zeroth_order as reference_zo
    from memzoo.triton_kernels.torch_backend import zeroth_order as torch_zo
    from memzoo.triton_kernels.torch_backend import compiled as compile_policy
    from memzoo.triton_kernels.torch_backend import zeroth_order_compiled as compiled

    monkeypatch.setenv(compile_policy.COMPILE_ENV, "always")
    params, stream_offsets, mask_offsets, mask_bits = _zo_pass_case(torch.Generator().manual_seed(3))
    expected = [p.clone() for p in params], mask_bits.clone()
    _run_zo_passes(reference_zo.zo_apply_, expected[0], stream_offsets, mask_offsets, expected[1])
    _run_zo_passes(torch_zo.zo_apply_, params, stream_offsets, mask_offsets, mask_bits)
    for actual, wanted in zip(params, expected[0]):
        assert actual.stride() == wanted.stride() and torch.equal(actual, wanted)
    assert torch.equal(mask_bits, expected[1])
    if compiled._FAILURE.reason:
        pytest.skip(f"torch.compile is not available here ({compiled._FAILURE.reason}): checked the eager fallback")
    assert all(compiled._STAGES[name].compiled is not None for name in ("philox", "dense", "pack", "read"))


def test_zeroth_order_pass_falls_back_to_eager_when_compiling_fails(monkeypatch) -> None:
    """No C++ compiler (or any compile error): one RuntimeWarning saying so, then every pass runs
    eagerly with the same results; small passes and several-seed updates never compile."""
    from memzoo.reference import zeroth_order as reference_zo
    from memzoo.triton_kernels.torch_backend import zeroth_order as torch_zo
    from memzoo.triton_kernels.torch_backend import compiled as compile_policy
    from memzoo.triton_kernels.torch_backend import zeroth_order_compiled as compiled

    monkeypatch.setenv(compile_policy.COMPILE_ENV, "auto")
    assert not compiled.compiles([torch.zeros(1000)], ())
    assert not compiled.compiles([torch.zeros(compile_policy.MIN_NUMEL)], (7,))
    assert compiled.compiles([torch.zeros(compile_policy.MIN_NUMEL // 2)] * 2, ())
    monkeypatch.setenv(compile_policy.COMPILE_ENV, "never")
    assert not compiled.compiles([torch.zeros(compile_policy.MIN_NUMEL)], ())

    def no_compiler(function, **options):
        def compiled_function(*args):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nc++: not found")
        return compiled_function

    monkeypatch.setenv(compile_policy.COMPILE_ENV, "always")
    failure = compile_policy.CompileFailure()
    monkeypatch.setattr(compiled, "_FAILURE", failure)
    monkeypatch.setattr(compiled, "_STAGES", {name: compile_policy.CompiledPass(stage.fn, stage.name, failure=failure)
                                              for name, stage in compiled._STAGES.items()})
    monkeypatch.setattr(torch, "compile", no_compiler)
    params, stream_offsets, mask_offsets, mask_bits = _zo_pass_case(torch.Generator().manual_seed(4))
    expected = [p.clone() for p in params], mask_bits.clone()
    _run_zo_passes(reference_zo.zo_apply_, expected[0], stream_offsets, mask_offsets, expected[1])
    with pytest.warns(RuntimeWarning, match="torch.compile of the zeroth-order pass failed .*RuntimeError") as caught:
        _run_zo_passes(torch_zo.zo_apply_, params, stream_offsets, mask_offsets, mask_bits)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert all(torch.equal(actual, wanted) for actual, wanted in zip(params, expected[0]))
    assert torch.equal(mask_bits, expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_steps_a_row_shard_as_the_whole_tensor(monkeypatch, dtype) -> None:
    """The dense AdamW branch through torch's fused kernel: any contiguous piece of a tensor (an
    FSDP2 row shard) steps bit for bit as the same elements of the whole tensor. The kernel's
    scalar loop for a length's last (n mod vector width) elements rounds unlike its vector loop;
    with every element sent through the vector loop (padded tails) position does not matter.
    Negative control: with the tails left to the kernel, a piece differs."""
    from memzoo.triton_kernels.torch_backend import galore as torch_galore_module

    generator = torch.Generator().manual_seed(0)
    n = 37 * 1000 + 13
    tensors = [torch.randn(n, generator=generator).to(dtype) for _ in range(2)]
    tensors += [(torch.randn(n, generator=generator) * 0.1).to(dtype), (torch.rand(n, generator=generator) * 0.1).to(dtype)]
    hparams = dict(step_size=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-2, weight_decay=0.1)
    pieces = [(0, 37 * 333 + 5), (37 * 333 + 5, 37 * 700), (37 * 700, n)]

    def pieces_equal_whole() -> bool:
        whole = [t.clone() for t in tensors]
        torch_galore.adamw_update_(*[[t] for t in whole], **hparams)
        same = True
        for start, end in pieces:
            piece = [t[start:end].clone() for t in tensors]
            torch_galore.adamw_update_(*[[t] for t in piece], **hparams)
            same &= all(torch.equal(a, b[start:end]) for a, b in zip(piece, whole))
        return same

    calls = []
    fused = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    assert pieces_equal_whole() and calls  # the fused kernel ran
    if dtype == torch.float32:  # (bf16's final rounding hides the scalar loop's float32 difference here)
        monkeypatch.setattr(torch_galore_module, "_FUSED_ALIGN", 1)
        assert not pieces_equal_whole()


# ---- Natural GaLore: Woodbury solves of same-sized histories batched -----------------------

def _natural_pairs(dtype: torch.dtype, seed: int, lengths: list[int], shape: tuple[int, int] = (3, 4),
                   count: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``count`` (gradient, history) pairs per history length, as the optimizer makes them: the
    gradient of ``shape`` is the history's last row; nearly collinear rows (a few steps of
    training, I + H·Hᵀ/λ badly conditioned) in every other pair."""
    generator = torch.Generator().manual_seed(seed)
    grads, histories = [], []
    for index, length in enumerate(lengths * count):
        d = shape[0] * shape[1]
        history = torch.randn(length, d, generator=generator)
        if index % 2:
            history = torch.randn(d, generator=generator) * 30 + 0.05 * history
        history = history.to(dtype)
        histories.append(history)
        grads.append(history[-1].reshape(shape).clone())
    return grads, histories


def _assert_natural_gradients_are_the_reference(grads, histories, results) -> None:
    for grad, history, result in zip(grads, histories, results):
        expected = reference_galore.natural_gradient(grad, history, damping=1e-3)
        assert result.shape == grad.shape and result.dtype == expected.dtype
        # Two float64 evaluations in different orders, each rounded once to the result's dtype:
        # they differ by float64's rounding times the condition of λI + H·Hᵀ (below 1 + ‖H‖²/λ).
        condition = 1.0 + history.double().square().sum().item() / 1e-3
        assert_close(result, expected, 8 * 2.0**-53 * condition * expected.double().abs().max().item(),
                     what=f"k={history.shape[0]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("pairs_per_chunk", [1, 3, None])
def test_natural_gradients_of_a_batch_are_the_reference(monkeypatch, dtype, pairs_per_chunk) -> None:
    """Histories of every length k = 1..5 and two sizes d in one call, interleaved, solved one
    pair per chunk, three per chunk (a partial last chunk) or all at once: each result is the
    reference's natural_gradient of its pair."""
    if pairs_per_chunk is not None:
        monkeypatch.setattr(torch_galore, "_pairs_per_chunk", lambda device, k, d: pairs_per_chunk)
    lengths = [1, 2, 3, 4, 5]
    grads, histories = _natural_pairs(dtype, 0, lengths, count=3)
    more_grads, more_histories = _natural_pairs(dtype, 1, lengths[::-1], shape=(5, 2), count=2)
    grads, histories = grads + more_grads, histories + more_histories
    order = torch.randperm(len(grads), generator=torch.Generator().manual_seed(2)).tolist()
    grads, histories = [grads[i] for i in order], [histories[i] for i in order]
    results = torch_galore.natural_gradients(grads, histories, damping=1e-3)
    _assert_natural_gradients_are_the_reference(grads, histories, results)
    (single,) = [torch_galore.natural_gradient(grads[0], histories[0], damping=1e-3)]
    _assert_natural_gradients_are_the_reference(grads[:1], histories[:1], [single])


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float64, torch.float64)], ids=["fp32", "bf16_history", "fp64"])
@pytest.mark.parametrize("pairs_per_chunk", [1, 4])
def test_natural_gradients_with_kept_grams_are_the_reference(monkeypatch, dtypes, pairs_per_chunk) -> None:
    """natural_gradients_with_grams, as Natural GaLore calls it on a ring-buffer history: a first
    call computes each H·Hᵀ whole (stale_rows None), later calls only the row just written; each
    result is the reference's (and natural_gradients'), each kept Gram H·Hᵀ in float64, with
    whole and one-row pairs mixed in a chunk. A bf16 history stores g rounded: the Gram takes
    the stored row, H·g the unrounded g."""
    grad_dtype, history_dtype = dtypes
    monkeypatch.setattr(torch_galore, "_pairs_per_chunk", lambda device, k, d: pairs_per_chunk)
    generator = torch.Generator().manual_seed(7)
    histories = [(torch.randn(4, 12, generator=generator, dtype=torch.float64) * scale).to(history_dtype)
                 for scale in (1.0, 30.0, 0.1, 3.0, 1.0)]
    histories[1] += histories[1][0].clone()  # nearly collinear rows: λI + H·Hᵀ badly conditioned
    grams = [torch.full((5, 5), math.nan, dtype=torch.float64) for _ in histories]  # (k_max 5 > k 4)
    for stale_rows in ([None] * 5, [1, 1, 3, 0, 2], [None, 2, 2, None, 3]):
        grads = []
        for history, row in zip(histories, stale_rows):
            grad = torch.randn(3, 4, generator=generator, dtype=torch.float64).to(grad_dtype)
            history[0 if row is None else row] = grad.reshape(-1)  # (rounded to bf16 there)
            grads.append(grad)
        results = torch_galore.natural_gradients_with_grams(grads, histories, grams, stale_rows, damping=1e-3)
        _assert_natural_gradients_are_the_reference(grads, histories, results)
        _assert_natural_gradients_are_the_reference(
            grads, histories, torch_galore.natural_gradients(grads, histories, damping=1e-3))
        for gram, history in zip(grams, histories):
            h = history.double()
            torch.testing.assert_close(gram[:4, :4], h @ h.T, rtol=1e-14, atol=0.0)
            assert gram[4].isnan().all()  # outside the k×k block: untouched


def test_natural_gradients_with_grams_reject_bad_input() -> None:
    grads, histories = _natural_pairs(torch.float32, 4, [2, 3])
    grams = [torch.zeros(3, 3, dtype=torch.float64) for _ in grads]
    cases = [([grams[0], grams[1].float()], [None, None], r"grams\[1\] must be a float64 matrix of at least 3×3"),
             ([grams[0], grams[1][:2, :2]], [None, None], r"grams\[1\] must be a float64 matrix"),
             (grams, [None, 3], r"stale_rows\[1\] must be None or a row of the k=3 history, got 3"),
             (grams, [None], "lists differ in length")]
    for kept, stale_rows, message in cases:
        with pytest.raises(ValueError, match=message):
            torch_galore.natural_gradients_with_grams(grads, histories, kept, stale_rows, damping=1e-3)
    assert torch.equal(grams[0], torch.zeros(3, 3, dtype=torch.float64))


def test_natural_gradients_take_the_qr_where_the_cholesky_breaks(monkeypatch) -> None:
    """λI + H·Hᵀ is Cholesky-factored; where rounding breaks that (|H|² far above λ/ε₆₄, nearly
    parallel rows) the chunk takes the reference's QR and its result stays finite and the
    reference's; an ordinary history never factors by QR."""
    calls = []
    geqrf = torch.geqrf
    monkeypatch.setattr(torch, "geqrf", lambda *args, **kwargs: calls.append(1) or geqrf(*args, **kwargs))
    row = torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    huge = torch.stack([row, row, row + 1e-9]) * 1e9  # H·Hᵀ rounds to singular: the λ = 1e-3 is lost
    assert int(torch.linalg.cholesky_ex(huge @ huge.T + 1e-3 * torch.eye(3))[1]) != 0
    (result,) = torch_galore.natural_gradients([huge[-1].clone()], [huge], damping=1e-3)
    assert calls and torch.isfinite(result).all()
    _assert_natural_gradients_are_the_reference([huge[-1]], [huge], [result])
    calls.clear()
    grads, histories = _natural_pairs(torch.float32, 5, [4], count=3)
    _assert_natural_gradients_are_the_reference(grads, histories,
                                                torch_galore.natural_gradients(grads, histories, damping=1e-3))
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("poison", ["nan_history", "inf_history_times_zero", "opposite_infs", "inf_grad"])
def test_a_nonfinite_pair_does_not_poison_its_batch(dtype, poison) -> None:
    """One pair with a NaN or Inf among four solved in one chunk: its result is all NaN (the
    reference's), the others are bit for bit what the same call gives without it."""
    grads, histories = _natural_pairs(dtype, 3, [3], count=4)
    clean = torch_galore.natural_gradients(grads, histories, damping=1e-3)
    grads[1] = grads[1].clone()
    if poison == "nan_history":
        histories[1][0, 5] = float("nan")
    elif poison == "inf_history_times_zero":  # H·g meets the Inf as Inf·0 = NaN
        grads[1].view(-1)[7] = 0.0
        histories[1][0, 7] = float("inf")
    elif poison == "opposite_infs":  # summed, +Inf and −Inf give NaN
        histories[1][1, 2], histories[1][1, 3] = float("inf"), float("-inf")
    else:
        grads[1].view(-1)[4] = float("-inf")
    results = torch_galore.natural_gradients(grads, histories, damping=1e-3)
    assert torch.isnan(results[1]).all()
    assert torch.isnan(reference_galore.natural_gradient(grads[1], histories[1], damping=1e-3)).all()
    for index in (0, 2, 3):
        assert torch.equal(results[index], clean[index]), index


def test_natural_gradients_reject_bad_input_before_solving() -> None:
    grads, histories = _natural_pairs(torch.float32, 4, [2, 3])
    for module in (reference_galore, torch_galore):
        with pytest.raises(ValueError, match=r"histories\[1\] must be k×12, got \(3, 11\)"):
            module.natural_gradients(grads, [histories[0], histories[1][:, :11]], damping=1e-3)
        with pytest.raises(ValueError, match="tensor lists differ in length"):
            module.natural_gradients(grads, histories[:1], damping=1e-3)
        with pytest.raises(ValueError, match=r"history must be k×12, got \(12,\)"):
            module.natural_gradient(grads[0], histories[0][0], damping=1e-3)
        with pytest.raises(TypeError, match=r"histories\[0\] must be a Tensor"):
            module.natural_gradients(grads[:1], [[1.0]], damping=1e-3)

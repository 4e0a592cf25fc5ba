"""GaLore-Adafactor: the whole-step reference against galore-torch 1.0's ``GaLoreAdafactor``,
the torch twin against the reference, and its argument checks."""

from __future__ import annotations

import pytest
import torch
from support import assert_close, official_package

from memzoo.reference import galore as reference
from memzoo.triton_kernels.torch_backend import galore as torch_galore

# galore-torch's defaults, and the whole-step function's group keys galore-torch does not have.
ADAFACTOR_DEFAULTS = dict(lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                          weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False)
STEP_KEYS = dict(seed=0, projector="svd", power_iters=2, oversample=8, strict_rank=False, state_dtype=None,
                 maximize=False)

_GRAD_SCALES = (1.0, 3.0, 0.5, 2.0, 4.0, 1.0, 6.0, 1.0)


def _grads(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * scale for scale in _GRAD_SCALES]


@pytest.mark.parametrize("options,proj_type", [
    (dict(lr=0.01, relative_step=False, scale_parameter=False), "std"),  # the scripts' setting
    ({}, "reverse_std"),  # the defaults: relative step, parameter scale
    (dict(lr=0.01, relative_step=False, beta1=0.9, weight_decay=0.1, clip_threshold=0.5), "full"),
])
def test_whole_step_follows_the_official_galore_adafactor_trajectory(options, proj_type) -> None:
    """A rank group with an m≥n and an m<n weight, and a dense group with a vector (unfactored),
    a matrix and a 3-D tensor (factored over its last two dimensions); 8 steps with
    update_proj_gap 3 cross refreshes at steps 1, 4 and 7."""
    official = official_package("galore_torch")
    shapes = [(12, 8), (8, 12), (12,), (5, 7), (2, 3, 4)]
    starts = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    theirs = [torch.nn.Parameter(start.clone()) for start in starts]
    ours = [start.clone() for start in starts]
    low_rank = dict(rank=3, update_proj_gap=3, scale=0.25, proj_type=proj_type)
    optimizer = official.GaLoreAdafactor([{"params": theirs[:2], **low_rank}, {"params": theirs[2:]}], **options)
    states = [{} for _ in ours]
    grads = [_grads(shape, 10 + i) for i, shape in enumerate(shapes)]
    keys = {**ADAFACTOR_DEFAULTS, **options}
    for t in range(len(_GRAD_SCALES)):
        for param, grad in zip(theirs, grads):
            param.grad = grad[t].clone()
        optimizer.step()
        for i, state in enumerate(states):
            ours[i], states[i] = reference.galore_adafactor_step(ours[i], grads[i][t], state, **keys, **STEP_KEYS,
                                                                 **{**low_rank, "rank": 3 if i < 2 else None})
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.detach(), rtol=2e-6, atol=2e-7)
    assert set(states[0]) >= {"proj_left" if proj_type != "std" else "proj_right", "exp_avg_sq_row", "exp_avg_sq_col"}
    # The factored moments of the 12×8 weight's R: 12×3 (right), 3×8 (left), 3×3 (both sides).
    low_rank_shape = {"std": (12, 3), "reverse_std": (3, 8), "full": (3, 3)}[proj_type]
    assert (states[0]["exp_avg_sq_row"].shape, states[0]["exp_avg_sq_col"].shape) == (low_rank_shape[:1],
                                                                                        low_rank_shape[1:])
    assert "exp_avg_sq" in states[2] and ("exp_avg" in states[2]) == ("beta1" in options)
    moved = min((a - s).abs().max().item() for a, s in zip(ours, starts))
    assert moved > 1e-3  # a comparison of weights that moved


@pytest.mark.parametrize("side", ["left", "right", "full", "dense"])
def test_torch_twin_of_the_apply_matches_the_reference(side) -> None:
    generator = torch.Generator().manual_seed(1)
    m, n, rank = 11, 7, 3
    param = torch.randn(m, n, generator=generator)
    left = torch.linalg.qr(torch.randn(m, rank, generator=generator)).Q if side in ("left", "full") else None
    right = torch.linalg.qr(torch.randn(n, rank, generator=generator)).Q.T.contiguous() \
        if side in ("right", "full") else None
    shape = (rank if left is not None else m, rank if right is not None else n)
    update = torch.randn(shape, generator=generator)
    lr = torch.tensor(0.03)
    expected = param.clone()
    hparams = dict(lefts=left, rights=right, scale=0.25 if side != "dense" else 1.0, weight_decay=0.2)
    reference.galore_adafactor_apply_(expected, update, lr, **hparams)
    torch_galore.galore_adafactor_apply_(param, update, lr, **hparams)
    assert_close(param, expected, 1e-6, what="weight")


def test_row_shard_arguments_for_a_single_shard_match_the_whole_tensor_step() -> None:
    """``reduce=`` / ``rows=`` (FSDP2 row shards, tests/test_fsdp_lowrank.py) with one shard holding
    every row: the sums over the shards replace the whole-tensor means (same values up to
    rounding) for a 2-D and a ≥3-D gradient, a right projection and a vector, with clipping
    biting and β1; ``adafactor_lr`` takes a given RMS(W); mismatched arguments raise before
    anything is written."""
    generator = torch.Generator().manual_seed(3)
    calls = []

    def reduce(tensor):  # one shard: the sum over the shards is the tensor itself
        calls.append(tensor.numel())
        return tensor

    hyper = dict(beta2=0.3, eps1=1e-30, clip_threshold=0.5, beta1=0.9, maximize=True)
    right = torch.linalg.qr(torch.randn(6, 2, generator=generator)).Q.T.contiguous()
    for shape, factor in (((5, 6), None), ((4, 3, 2), None), ((5, 6), right)):
        grad = torch.randn(shape, generator=generator)
        low = (shape[0], 2) if factor is not None else shape
        start = [torch.rand(low[:-1], generator=generator) + 0.5,
                 torch.rand(low[:-2] + low[-1:], generator=generator) + 0.5, torch.randn(low, generator=generator)]
        states = [[tensor.clone() for tensor in start] for _ in range(2)]
        updates = [torch.empty(low), torch.empty(low)]
        lr = torch.tensor(0.1)
        reference.galore_adafactor_project_(grad, *states[0], updates[0], lr, lefts=None, rights=factor, **hyper)
        calls.clear()
        reference.galore_adafactor_project_(grad, *states[1], updates[1], lr, lefts=None, rights=factor, **hyper,
                                            reduce=reduce, rows=[shape[0]])
        # 2-D: column sums + Σ row EMA, then ΣU²; ≥3-D: its means are local, only ΣU².
        assert calls == ([low[-1] + 1, 1] if len(low) == 2 else [1]), (shape, calls)
        for got, expected in zip([*states[1], updates[1]], [*states[0], updates[0]]):
            assert_close(got, expected, 1e-6, what=f"{shape} state")
    param, grad = torch.randn(7, generator=generator), torch.randn(7, generator=generator)
    results = []
    v = torch.rand(7, generator=generator) + 0.5
    for extra in ({}, dict(reduce=reduce, rows=[7])):
        weight = param.clone()
        reference.adafactor_update_(weight, grad, v.clone(), torch.zeros(7), torch.tensor(0.1), weight_decay=0.1,
                                    **hyper, **extra)
        results.append(weight)
    assert_close(results[1], results[0], 1e-6, what="vector")
    lr_kwargs = dict(lr=None, step=3, relative_step=True, scale_parameter=True, warmup_init=False, eps2=1e-3)
    rms = param.norm() / 7**0.5
    assert torch.equal(reference.adafactor_lr(param[:2], rms=rms, **lr_kwargs), reference.adafactor_lr(param, **lr_kwargs))
    grad, row, col, update = torch.randn(6, 4), torch.zeros(6), torch.zeros(4), torch.empty(6, 4)
    kwargs = dict(lefts=None, rights=None, beta2=0.5, eps1=1e-30, clip_threshold=1.0)
    with pytest.raises(ValueError, match="give reduce and rows together"):
        reference.galore_adafactor_project_(grad, row, col, None, update, torch.tensor(0.1), reduce=reduce, **kwargs)
    with pytest.raises(ValueError, match=r"rows\[0\] = 5"):
        reference.galore_adafactor_project_(grad, row, col, None, update, torch.tensor(0.1), reduce=reduce, rows=[5],
                                            **kwargs)
    assert torch.equal(row, torch.zeros(6))  # nothing written


def test_argument_checks() -> None:
    from memzoo.optim import GaLoreAdafactor

    # galore-torch's constructor checks; its groups are not checked so (a scheduler may write an lr).
    with pytest.raises(ValueError, match="Cannot combine manual `lr` and `relative_step=True`"):
        GaLoreAdafactor([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    with pytest.raises(ValueError, match="`warmup_init=True` requires `relative_step=True`"):
        GaLoreAdafactor([torch.nn.Parameter(torch.randn(3))], lr=1e-3, relative_step=False, warmup_init=True)
    relative = GaLoreAdafactor([{"params": [torch.nn.Parameter(torch.randn(3))], "lr": 0.5}])
    assert relative.param_groups[0]["lr"] == 0.5 and relative.param_groups[0]["relative_step"]
    weight = torch.randn(6, 4)
    with pytest.raises(ValueError, match="needs lr when relative_step is False"):
        reference.galore_adafactor_step(weight, torch.randn(6, 4), {}, **{**ADAFACTOR_DEFAULTS, "relative_step": False},
                                        rank=2, update_proj_gap=2, scale=1.0, proj_type="std", **STEP_KEYS)
    grad, row, col, update = torch.randn(6, 4), torch.zeros(6), torch.zeros(4), torch.empty(6, 4)
    kwargs = dict(lefts=None, rights=None, beta2=0.5, eps1=1e-30, clip_threshold=1.0)
    with pytest.raises(ValueError, match="exactly when beta1 is set"):
        reference.galore_adafactor_project_(grad, row, col, None, update, torch.tensor(0.1), beta1=0.9, **kwargs)
    with pytest.raises(ValueError, match="exp_avg_sq_row"):
        reference.galore_adafactor_project_(grad, torch.zeros(4), col, None, update, torch.tensor(0.1), **kwargs)
    assert torch.equal(row, torch.zeros(6))  # nothing written


@pytest.mark.parametrize("options", [dict(lr=0.01, relative_step=False, scale_parameter=False),
                                     dict(beta1=0.9, weight_decay=0.1)])
def test_optimizer_follows_the_official_galore_adafactor_trajectory(options) -> None:
    """GaLoreAdafactor (torch backend, exact SVD) against galore-torch's GaLoreAdafactor, through
    the engine: the scripts' setting, and the defaults (relative step, parameter scale) with β1."""
    from memzoo.optim import GaLoreAdafactor

    official = official_package("galore_torch")
    shapes = [(12, 8), (8, 12), (12,), (5, 7)]
    starts = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    theirs = [torch.nn.Parameter(start.clone()) for start in starts]
    ours = [torch.nn.Parameter(start.clone()) for start in starts]
    group = dict(rank=3, update_proj_gap=3, scale=0.25, proj_type="std")
    their_optimizer = official.GaLoreAdafactor([{"params": theirs[:2], **group}, {"params": theirs[2:]}], **options)
    our_optimizer = GaLoreAdafactor([{"params": ours[:2], **group}, {"params": ours[2:]}], projector="svd",
                                    backend="torch", **options)
    grads = [_grads(shape, 10 + i) for i, shape in enumerate(shapes)]
    for t in range(len(_GRAD_SCALES)):
        for params in (theirs, ours):
            for param, grad in zip(params, grads):
                param.grad = grad[t].clone()
        their_optimizer.step()
        our_optimizer.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=1e-6)
    assert "betas" not in our_optimizer.param_groups[0]  # Adafactor has none

"""COSMOS (Liu et al. 2025, "COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training
of LLMs"), as the official ``COSMOS_optim.py`` does it: SOAP-style Adam in the leading
r-dimensional eigensubspace of the input side of each m×n weight, and a Muon (Newton–Schulz
orthogonalized) step on the complement.

Also the shared Newton–Schulz orthogonalization (Muon's quintic iteration).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["NS_COEFFICIENTS", "NS_DTYPES", "cosmos_apply_", "cosmos_basis_init", "cosmos_basis_update",
           "cosmos_directions_", "cosmos_update_", "frobenius_normalize", "newton_schulz5", "orthogonalize_",
           "power_of_two_scale"]

NS_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
Orthogonalize = Callable[..., None]
# Sums a tensor over the row shards of a sharded matrix (identity on a whole one); see
# memzoo.optim.cosmos for COSMOS on FSDP2 row shards.
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _reduced(tensor: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
    return tensor if reduce is None else reduce(tensor)

# Muon's quintic Newton–Schulz coefficients (Jordan et al. 2024), as in the official COSMOS.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(matrix: torch.Tensor, *, steps: int = 5, eps: float = 1e-7,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """≈ the orthogonal polar factor U·Vᵀ of ``matrix`` (2-D): X = M/(‖M‖_F + eps) in ``dtype``
    (bf16 as the official code: products in bf16 with fp32 accumulation), transposed so that
    rows ≤ columns, then ``steps`` times A = X·Xᵀ, B = A·X, X ← a·X + b·B + c·A·B. Returns
    ``dtype``; an all-zero matrix (or an empty one) stays zero."""
    if matrix.dim() != 2:
        raise ValueError(f"newton_schulz5 takes a matrix, got shape {tuple(matrix.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = frobenius_normalize(matrix.to(dtype), eps=eps)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T  # symmetric: A = X·Xᵀ
        product = gram @ x
        x = a * x + b * product + c * (gram @ product)
    return x.T if transposed else x


def frobenius_normalize(matrices: torch.Tensor, *, eps: float, dim: tuple[int, int] | None = None) -> torch.Tensor:
    """X/(‖X‖_F + eps), of the whole tensor or per matrix over ``dim`` (batched), in X's dtype,
    without overflow: X is first scaled by :func:`power_of_two_scale` (exact), and eps with it,
    so the result is the same while ‖X‖² would overflow for |x| ≳ 1e19 (fp32/bf16) and turn a
    large finite input into a zero. Empty input is returned as it is."""
    if matrices.numel() == 0:
        return matrices
    scale = power_of_two_scale(matrices, dim=dim)
    scaled = matrices * scale
    norm = torch.linalg.vector_norm(scaled) if dim is None else torch.linalg.vector_norm(scaled, dim=dim, keepdim=True)
    return scaled / (norm + eps * scale)


def check_orthogonalize_arguments(matrices: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                                  steps: int) -> None:
    """Raise ValueError/TypeError for what :func:`orthogonalize_` and its Triton twin refuse."""
    if len(matrices) != len(outputs):
        raise ValueError(f"{len(matrices)} matrices but {len(outputs)} outputs")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int ≥ 0, got {steps!r}")
    for index, (matrix, output) in enumerate(zip(matrices, outputs)):
        if matrix.dim() != 2:
            raise ValueError(f"matrices[{index}] has shape {tuple(matrix.shape)}; Newton–Schulz takes matrices")
        if output.shape != matrix.shape:
            raise ValueError(f"outputs[{index}] has shape {tuple(output.shape)}, matrices[{index}] {tuple(matrix.shape)}")
        if output.dtype not in NS_DTYPES:
            raise TypeError(f"outputs[{index}] is {output.dtype}; the iteration runs in one of {NS_DTYPES}")


@torch.no_grad()
def orthogonalize_(matrices: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], *, steps: int = 5,
                   eps: float = 1e-7) -> None:
    """outputs[i] ← :func:`newton_schulz5` (matrices[i]) computed in outputs[i]'s dtype (bf16 for
    the official Muon/COSMOS iteration). Matrices of one shape are what the kernel batches."""
    check_orthogonalize_arguments(matrices, outputs, steps)
    for matrix, output in zip(matrices, outputs):
        output.copy_(newton_schulz5(matrix, steps=steps, eps=eps, dtype=output.dtype))


def power_of_two_scale(tensor: torch.Tensor, *, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """2^−e with 2^e the power of two just above max|tensor| (over ``dim``, keepdims; the whole
    tensor when None), as a tensor of ``tensor``'s dtype and device, no host sync. Multiplying
    by it is exact (barring subnormals) and brings the largest magnitude into [0.5, 1), so sums
    of squares of the scaled tensor cannot overflow. |e| is clamped so that the factor stays a
    normal number; an all-zero tensor gets 1; a non-finite one a factor whose product is
    non-finite too (left to the caller's guard)."""
    magnitude = tensor.abs().amax() if dim is None else tensor.abs().amax(dim=dim, keepdim=True)
    _, exponent = torch.frexp(magnitude)
    limit = math.frexp(torch.finfo(tensor.dtype).max)[1] - 2  # 126 for fp32, 1022 for fp64
    return torch.ldexp(torch.ones_like(magnitude), -exponent.clamp(-limit, limit))


def _scaled_gram_ema(previous: torch.Tensor | None, projected: torch.Tensor, scale: torch.Tensor,
                     beta2: float, reduce: Reduce | None = None) -> torch.Tensor:
    """previous + (1 − β2)·(Xᵀ·X)/s² for X = G·s·U (the projected, scaled gradient), combined
    in float64 so that neither 1/s² nor the sum overflows, then rounded to X's dtype with
    saturation: a subspace whose true value exceeds the dtype's range is held at its largest
    finite value (the closest one) instead of becoming Inf. ``previous`` is the already decayed
    earlier term (β2·TᵀST), or None; ``reduce`` sums the Gram matrix over row shards."""
    scale = scale.to(torch.float64)
    gram = _reduced(projected.T @ projected, reduce).to(torch.float64) / scale / scale
    total = (1.0 - beta2) * gram
    if previous is not None:
        total = total + previous.to(torch.float64)
    limit = torch.finfo(projected.dtype).max
    return total.clamp(-limit, limit).to(projected.dtype)


def cosmos_basis_init(grad: torch.Tensor, rank: int, *, beta2: float, reduce: Reduce | None = None,
                      scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """First step: U = the r leading eigenvectors of GᵀG (n×r, the input side of an m×n G) and
    S = (1 − β2)·(G·U)ᵀ(G·U) (r×r). Computed in float32 (float64 for float64 G).

    Scale-safe: U comes from the Gram of G·s, s = :func:`power_of_two_scale` (G), the same
    eigenvectors (exactly scaled matrix), so a finite G never overflows GᵀG (|g| ≈ 1e20 in fp32
    did, and wrote a NaN basis); S is formed in float64 and saturates at the dtype's range.

    On row shards ``grad`` is this rank's rows, ``reduce`` sums the n×n and r×r Gram matrices
    over the shards and ``scale`` is s of the whole G (both None on a whole G)."""
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.to(dtype)
    scale = power_of_two_scale(g) if scale is None else scale
    g = g * scale
    _, vectors = torch.linalg.eigh(_reduced(g.T @ g, reduce))  # ascending eigenvalues
    basis = vectors.flip(-1)[:, :rank].contiguous()
    return basis, _scaled_gram_ema(None, g @ basis, scale, beta2, reduce)


def cosmos_basis_update(grad: torch.Tensor, basis: torch.Tensor, subspace: torch.Tensor, *, beta2: float,
                        reduce: Reduce | None = None, scale: torch.Tensor | None = None,
                        projection_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Later steps: one power iteration on the EMA of GᵀG represented as U·S·Uᵀ:
    Ũ = β2·U·S + (1 − β2)·Gᵀ(G·U); U' = QR(Ũ).Q; with T = Uᵀ·U',
    S' = β2·Tᵀ·S·T + (1 − β2)·(G·U')ᵀ(G·U'). In the basis's dtype (float32/float64).

    Scale-safe as :func:`cosmos_basis_init`: the m×n products use G·s (s a power of two), the
    two terms of Ũ are combined in float64 and Ũ is rescaled by a power of two before the QR
    (which a positive scale does not change), and S' saturates at the dtype's range. Row shards:
    ``reduce`` and ``scale`` as in :func:`cosmos_basis_init` (an n×r and an r×r sum).

    ``projection_out`` (m×r, the basis's dtype), when given, receives G·U' for
    :func:`cosmos_directions_` (its ``projected``), which then does not form it again: the
    product of G·s and U' computed here, divided by s (exact for a power of two: the same
    value as G·U' barring overflow or subnormals)."""
    dtype = basis.dtype
    scale = power_of_two_scale(grad.to(dtype)) if scale is None else scale
    g = grad.to(dtype) * scale
    wide_scale = scale.to(torch.float64)
    gram_part = _reduced(g.T @ (g @ basis), reduce).to(torch.float64) / wide_scale / wide_scale  # = Gᵀ(G·U)
    iterate = beta2 * (basis.to(torch.float64) @ subspace.to(torch.float64)) + (1.0 - beta2) * gram_part
    iterate = (iterate * power_of_two_scale(iterate)).to(dtype)
    new_basis, _ = torch.linalg.qr(iterate, mode="reduced")
    rotation = basis.T @ new_basis
    decayed = beta2 * (rotation.T.to(torch.float64) @ subspace.to(torch.float64) @ rotation.to(torch.float64))
    projected = g @ new_basis
    if projection_out is not None:
        if tuple(projection_out.shape) != tuple(projected.shape) or projection_out.dtype != dtype:
            raise ValueError(f"projection_out is {tuple(projection_out.shape)} {projection_out.dtype}; G·U' is "
                             f"{tuple(projected.shape)} {dtype}")
        torch.div(projected, scale, out=projection_out)
    return new_basis, _scaled_gram_ema(decayed, projected, scale, beta2, reduce)


def _check_shapes(param: torch.Tensor, named: tuple[tuple[str, torch.Tensor | None, tuple[int, int]], ...]) -> None:
    if param.dim() != 2:
        raise ValueError(f"COSMOS updates matrices, got shape {tuple(param.shape)}")
    for name, tensor, shape in named:
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} for a "
                             f"{param.shape[0]}×{param.shape[1]} weight")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.no_grad()
def cosmos_directions_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    basis: torch.Tensor,
    residual: torch.Tensor | None,
    *,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool = False,
    projected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 1–4 of :func:`cosmos_update_` and the complement of step 5: updates M and V in
    place, writes Ĝ − Ĝ·U·Uᵀ into ``residual`` (m×n in the Newton–Schulz dtype, whose first
    operation is that rounding; None when r = n), and returns the subspace direction's
    coordinates N = (Ĝ·U)/(√V/√b2 + ε) (m×r; A = N·Uᵀ). ``projected``: G·U (m×r) for this
    ``basis`` when the caller has it (``projection_out`` of :func:`cosmos_basis_update`; the
    caller vouches that it belongs to this basis), else formed here."""
    m, n = param.shape
    rank = basis.shape[1]
    _check_shapes(param, (("grad", grad, (m, n)), ("exp_avg", exp_avg, (m, n)), ("exp_avg_sq", exp_avg_sq, (m, rank)),
                          ("basis", basis, (n, rank)), ("residual", residual, (m, n)),
                          ("projected", projected, (m, rank))))
    dtype = _compute_dtype(param, grad, basis)
    g = grad.to(dtype)
    if maximize:
        g = -g
    u = basis.to(dtype)
    bias1 = (1.0 - beta1**step) / (1.0 - beta1)
    bias2 = 1.0 - beta2**step
    momentum = exp_avg.to(dtype) * beta1 + g  # (1) M ← β1·M + G
    projected = g @ u if projected is None else projected.to(dtype)  # (its sign does not matter: squared)
    second = exp_avg_sq.to(dtype) * beta2 + (1.0 - beta2) * projected * projected  # (2) V ← β2·V + (1−β2)(GU)²
    mixed = (g + beta1 * momentum) / (1.0 + beta1 * bias1)  # (3) Ĝ
    mixed_low = mixed @ u
    if residual is not None:
        residual.copy_(mixed - mixed_low @ u.T)  # (5) the complement's part of Ĝ
    exp_avg.copy_(momentum)
    exp_avg_sq.copy_(second)
    return mixed_low / (second.sqrt() / math.sqrt(bias2) + eps)  # (4) A = N·Uᵀ


@torch.no_grad()
def cosmos_apply_(
    param: torch.Tensor,
    low_rank: torch.Tensor,
    basis: torch.Tensor,
    orthogonal: torch.Tensor | None,
    *,
    lr: float,
    lr_ratio: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    whole_rows: int | None = None,
) -> None:
    """Steps 5–6 of :func:`cosmos_update_` given N (m×r) and O = NS5(residual) (None when r = n):
    D = N·Uᵀ + γ·√(mn)·O/(‖O‖ + ε); W ← W·(1 − lr·λ) − lr·ρ·√(mn)·D/(‖D‖ + ε). On row shards
    the tensors are this rank's rows, ``norm`` the Frobenius norm over all shards and
    ``whole_rows`` m (both None on a whole weight)."""
    m, n = param.shape
    _check_shapes(param, (("low_rank", low_rank, (m, basis.shape[1])), ("basis", basis, (n, basis.shape[1])),
                          ("orthogonal", orthogonal, (m, n))))
    dtype = _compute_dtype(param, low_rank, basis)
    scale = math.sqrt((m if whole_rows is None else whole_rows) * n)
    frobenius = torch.Tensor.norm if norm is None else norm
    update = low_rank.to(dtype) @ basis.to(dtype).T
    if orthogonal is not None:
        o = orthogonal.to(dtype)
        update = update + gamma * scale * o / (frobenius(o) + eps)
    w = param.to(dtype) * (1.0 - lr * weight_decay)  # (6) decay first, then the normalized step
    w = w - (lr * lr_ratio * scale) * update / (frobenius(update) + eps)
    param.copy_(w)


@torch.no_grad()
def cosmos_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    basis: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    gamma: float,
    lr_ratio: float,
    weight_decay: float,
    maximize: bool = False,
    ns_dtype: torch.dtype = torch.bfloat16,
    orthogonalize: Orthogonalize | None = None,
    apply: Callable[..., None] | None = None,
    directions: Callable[..., torch.Tensor] | None = None,
) -> None:
    """One COSMOS step of an m×n weight given this step's basis U (n×r, from
    :func:`cosmos_basis_init` / :func:`cosmos_basis_update`); updates param, exp_avg (M, m×n)
    and exp_avg_sq (V, m×r) in place. With b1 = (1 − β1^t)/(1 − β1), b2 = 1 − β2^t:

    1. M ← β1·M + G (an unnormalized sum, as the official code);
    2. V ← β2·V + (1 − β2)·(G·U)²;
    3. Ĝ = (G + β1·M)/(1 + β1·b1) (Nesterov mix, normalized);
    4. A = [(Ĝ·U)/(√V/√b2 + ε)]·Uᵀ (Adam in the subspace);
    5. B = √(mn)·O/(‖O‖_F + ε), O = NS5(Ĝ − Ĝ·U·Uᵀ) (Muon on the complement; B = 0 when r = n);
    6. D = A + γ·B; W ← W·(1 − lr·λ) − lr·ρ·√(mn)·D/(‖D‖_F + ε) (every update has RMS lr·ρ).

    The official code writes Ĝ into ``p.grad``; here the gradient is left as it was.
    ``directions`` computes steps 1–4, ``orthogonalize`` NS5 and ``apply`` step 6
    (:func:`cosmos_directions_`, :func:`orthogonalize_` and :func:`cosmos_apply_` when None; the
    other backends pass theirs). The optimizer
    runs the same three stages (:func:`cosmos_directions_`, ``orthogonalize``,
    :func:`cosmos_apply_`) over many weights at once, so that NS5 is batched.
    """
    m, n = param.shape if param.dim() == 2 else (0, 0)
    residual = torch.empty((m, n), dtype=ns_dtype, device=param.device) if basis.shape[-1] < n else None
    low_rank = (directions or cosmos_directions_)(param, grad, exp_avg, exp_avg_sq, basis, residual, step=step,
                                                  beta1=beta1, beta2=beta2, eps=eps, maximize=maximize)
    if residual is not None:
        (orthogonalize or orthogonalize_)([residual], [residual])
    (apply or cosmos_apply_)(param, low_rank, basis, residual, lr=lr, lr_ratio=lr_ratio, gamma=gamma, eps=eps,
                             weight_decay=weight_decay)

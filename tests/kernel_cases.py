"""What the equivalence tests (tests/test_kernels.py, tests/test_gpu.py) add to each benchmarked
kernel of :mod:`memzoo.bench.kernel_cases`: the hypothesis spaces its calls are drawn from and the
error analysis that bounds how far two correct implementations may differ."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from memzoo.bench import kernel_cases as cases
from memzoo.bench.kernel_cases import KernelCase, KernelPair, as_list


@dataclass(frozen=True)
class KernelTest:
    """A benchmarked kernel (``pair``) with its test spaces and tolerances."""

    pair: KernelPair
    # Uniform ranges hypothesis draws floats from; flags are drawn as booleans.
    hparam_ranges: Mapping[str, tuple[float, float]]
    flags: tuple[str, ...]
    # Per output tensor: extra absolute difference allowed element-wise, computed from the inputs,
    # where the math is discontinuous (sign(c) with c within rounding of 0) or where rounding
    # differences are amplified (a matrix product's accumulation order through Adam's division).
    extra_tolerance: Callable[[KernelCase], list[list[torch.Tensor | float]]]
    # Discrete hyperparameters drawn from these options (e.g. projection side, rank).
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # How many tensors one call takes at most.
    max_tensors: int = 4
    # Relative difference allowed on top of the storage dtype's rounding.
    extra_rtol: float = 0.0

    @property
    def name(self) -> str:
        return self.pair.name


# ---- Lion ---------------------------------------------------------------------------------

def _lion_extra_tolerance(case: KernelCase) -> list[list[torch.Tensor | float]]:
    params, grads, exp_avgs = case.args
    beta1, lr = case.kwargs["beta1"], case.kwargs["lr"]
    sign = -1.0 if case.kwargs.get("maximize", False) else 1.0
    extra_p = []
    for grad, exp_avg in zip(grads, exp_avgs):
        momentum_term = beta1 * exp_avg.double()
        grad_term = sign * (1.0 - beta1) * grad.double()
        # c = β1·m + (1 − β1)·g is formed in fp32; when its nonzero terms cancel to within a few
        # ulps its sign may differ between implementations (FMA contraction), moving W by up to
        # 2·lr more. An exact 0 from zero terms is not ambiguous: sign(0) = 0 everywhere.
        magnitude = momentum_term.abs() + grad_term.abs()
        ambiguous = ((momentum_term + grad_term).abs() <= 8 * 2.0**-24 * magnitude) & (magnitude > 0)
        extra_p.append(torch.where(ambiguous, 2.0 * lr, 0.0))
    return [extra_p, [0.0] * len(exp_avgs)]


LION = KernelTest(
    cases.LION,
    hparam_ranges={"lr": (1e-5, 1e-1), "beta1": (0.0, 0.999), "beta2": (0.0, 0.999), "weight_decay": (0.0, 1.0)},
    flags=("maximize",),
    extra_tolerance=_lion_extra_tolerance,
)


# ---- GaLore --------------------------------------------------------------------------------

def _gemm_unit_roundoff(device: torch.device) -> float:
    """Unit roundoff of the kernels' matrix products: TF32 inputs on a GPU, fp32 otherwise.

    TF32 keeps 10 mantissa bits, and Triton's tensor-core dot truncates fp32 operands to them
    (triton-lang/triton#4574) instead of rounding: relative error up to 2⁻¹⁰, not 2⁻¹¹ (an H100
    run measured 1.4e-3 on a single product, above the 2·2⁻¹¹ bound)."""
    if device.type == "cuda":
        from memzoo.triton_kernels.galore import PRECISION

        if PRECISION == "tf32":
            return 2.0**-10
    return 2.0**-24


def _product_error(low_rank_or_grad, left, right, *, back: bool) -> torch.Tensor:
    """Bound on |computed − exact| of a product chain (either implementation): 2·k·u·(|·| chain),
    k the total contraction length (Higham's γ_k bound, doubled for two implementations)."""
    from memzoo.reference.projector import project, project_back

    x = low_rank_or_grad.double()
    l_abs = None if left is None else left.double().abs()
    r_abs = None if right is None else right.double().abs()
    if back:
        k = (left.shape[1] if left is not None else 0) + (right.shape[0] if right is not None else 0)
        magnitude = project_back(x.abs(), l_abs, r_abs)
    else:
        k = (left.shape[0] if left is not None else 0) + (right.shape[1] if right is not None else 0)
        magnitude = project(x.abs(), l_abs, r_abs)
    return 2 * k * _gemm_unit_roundoff(x.device) * magnitude


def _projected_adam_errors(case: KernelCase):
    """Per matrix of a projection case (grads, exp_avgs, exp_avg_sqs, ...; factors in kwargs):
    float64 R, N, and bounds on the differences two implementations may show in R, m, v and N."""
    from memzoo.reference.projector import project

    beta1, beta2, eps = case.kwargs["beta1"], case.kwargs["beta2"], case.kwargs["eps"]
    for grad, exp_avg, exp_avg_sq, _, left, right in zip(*case.args, case.kwargs["lefts"], case.kwargs["rights"]):
        g = grad.double().reshape(grad.shape[0], -1)
        r = project(g, None if left is None else left.double(), None if right is None else right.double())
        if case.kwargs.get("maximize", False):
            r = -r
        dr = _product_error(g, left, right, back=False)
        m = beta1 * exp_avg.double() + (1 - beta1) * r
        v = beta2 * exp_avg_sq.double() + (1 - beta2) * r * r
        dm = (1 - beta1) * dr
        dv = (1 - beta2) * (2 * r.abs() * dr + dr * dr)
        root = v.sqrt()
        droot = torch.minimum(dv.sqrt(), dv / (2 * root).clamp_min(1e-300))
        # N = m/(√v + ε): first-order change from m, plus from √v, over the smallest denominator.
        dn = (dm + m.abs() * droot / (root + eps)) / (root + eps - droot).clamp_min(eps)
        yield r, dr, m / (root + eps), dm, dv, dn


def _galore_project_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    bounds: list[list[torch.Tensor]] = [[], [], []]
    for _, _, _, dm, dv, dn in _projected_adam_errors(case):
        for bound, value in zip(bounds, (dm, dv, dn)):
            bound.append(value)
    return bounds


def _galore_apply_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    coefficient = case.kwargs["step_size"] * case.kwargs["scale"]
    decay = case.kwargs["lr"] * case.kwargs["weight_decay"]
    bounds = []
    for param, update, left, right in zip(*case.args, case.kwargs["lefts"], case.kwargs["rights"]):
        error = coefficient * _product_error(update, left, right, back=True)
        bounds.append((1 + decay) * error.reshape(param.shape))
    return [bounds]


_GALORE_CHOICES = {"side": ("left", "right", "full"), "rank": (1, 2, 5, 16, 40), "batch": ("mixed", "same")}


GALORE_PROJECT = KernelTest(
    cases.GALORE_PROJECT,
    hparam_ranges={"beta1": (0.0, 0.999), "beta2": (0.0, 0.999), "eps": (1e-8, 1e-3)},
    flags=("maximize",),
    choices=_GALORE_CHOICES,
    max_tensors=3,
    extra_tolerance=_galore_project_tolerance,
)


GALORE_APPLY = KernelTest(
    cases.GALORE_APPLY,
    hparam_ranges={"step_size": (1e-4, 1e-1), "scale": (0.1, 4.0), "lr": (1e-4, 1e-1), "weight_decay": (0.0, 1.0)},
    flags=(),
    choices=_GALORE_CHOICES,
    max_tensors=3,
    extra_tolerance=_galore_apply_tolerance,
)


# ---- APOLLO --------------------------------------------------------------------------------

def _apollo_scales_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    """m and v as GaLore's; a factor ‖N_c‖/(‖R_c‖ + 1e-8) moves by at most
    (‖δN_c‖ + s_c·‖δR_c‖)/(‖R_c‖ + 1e-8 − ‖δR_c‖) (triangle inequality on each norm)."""
    from memzoo.reference.apollo import NORM_EPS

    bounds: list[list[torch.Tensor]] = [[], [], []]
    for (r, dr, n, dm, dv, dn), scale in zip(_projected_adam_errors(case), case.args[3]):
        if scale.numel() == 1:
            norms = lambda x: x.norm().reshape(1, 1)  # noqa: E731
        else:
            dim = 1 if scale.shape[1] == 1 else 0
            norms = lambda x, dim=dim: x.norm(dim=dim, keepdim=True)  # noqa: E731
        ratio = norms(n) / (norms(r) + NORM_EPS)
        denominator = (norms(r) + NORM_EPS - norms(dr)).clamp_min(1e-300)
        bounds[0].append(dm)
        bounds[1].append(dv)
        bounds[2].append(((norms(dn) + ratio * norms(dr)) / denominator).reshape(scale.shape))
    return bounds


def _apollo_apply_tolerance(case: KernelCase) -> list[list[torch.Tensor | float]]:
    """‖G⊙s‖ is summed in another order (relative error ≤ (k + 4)·2⁻²⁴ for k elements), which
    moves the limiter's factor, ρ and the update by as much, relatively; the update's own
    operations are rounded in another order (a few ulps of |c·S|)."""
    params, grads, scales, norms = case.args
    kwargs = case.kwargs
    coefficient = kwargs["step_size"] * math.sqrt(kwargs["scale"])
    weights, rhos = [], []
    for param, grad, factor in zip(params, grads, scales):
        k = param.numel()
        delta = (k + 8) * 2.0**-24
        update = coefficient * (grad.double().reshape(param.shape[0], -1) * factor.double()).abs()
        weights.append(((1 + kwargs["lr"] * kwargs["weight_decay"]) * update * delta).reshape(param.shape))
        rhos.append(delta * (grad.double().reshape(param.shape[0], -1) * factor.double()).norm().item()
                    * (math.sqrt(kwargs["scale"]) if kwargs.get("scale_front") else 1.0) + 1e-6)
    return [weights, rhos] if norms is not None else [weights]


APOLLO_SCALES = KernelTest(
    cases.APOLLO_SCALES,
    hparam_ranges={"beta1": (0.0, 0.999), "beta2": (0.0, 0.999), "eps": (1e-8, 1e-3)},
    flags=("maximize",),
    choices={"side": ("left", "right"), "rank": (1, 2, 5, 16, 40), "granularity": ("channel", "tensor"),
             "batch": ("mixed", "same")},
    max_tensors=3,
    extra_tolerance=_apollo_scales_tolerance,
)


APOLLO_APPLY = KernelTest(
    cases.APOLLO_APPLY,
    hparam_ranges={"step_size": (1e-4, 1e-1), "scale": (0.1, 128.0), "lr": (1e-4, 1e-1), "weight_decay": (0.0, 1.0),
                   "growth_limit": (1.0, 1.5)},
    flags=("record_only", "scale_front", "maximize"),
    choices={"granularity": ("rows", "columns", "tensor"), "limiter": (True, False), "batch": ("mixed", "same")},
    max_tensors=3,
    extra_tolerance=_apollo_apply_tolerance,
)


# ---- FRUGAL --------------------------------------------------------------------------------

def _frugal_apply_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    """The state-full product as GaLore's back-projection; the residual G − up(down(G)) may
    differ by its product error (zero for 0/1 coordinate factors, whose products are exact),
    which moves W by that much (SGD) or flips sign(E) where |E| is within it (2·η_free)."""
    from memzoo.reference.projector import project, project_back

    kwargs = case.kwargs
    bounds = []
    for param, grad, update, left, right in zip(*case.args, kwargs["lefts"], kwargs["rights"]):
        m = param.shape[0]
        factor = left if left is not None else right
        exact = bool(((factor == 0) | (factor == 1)).all())
        bound = kwargs["step_size"] * _product_error(update, left, right, back=True)
        g = grad.double().reshape(m, -1)
        lf = None if left is None else left.double()
        rf = None if right is None else right.double()
        residual = g - project_back(project(g, lf, rf), lf, rf)
        if exact:
            error = torch.zeros_like(residual)
        else:
            magnitude = project_back(project(g.abs(), None if lf is None else lf.abs(), None if rf is None else rf.abs()),
                                     None if lf is None else lf.abs(), None if rf is None else rf.abs())
            error = 4 * factor.shape[0 if right is not None else 1] * 2.0**-24 * magnitude + 2.0**-24 * g.abs()
        rule = kwargs["residual_rule"]
        if rule == "sgd":
            bound = bound + kwargs["residual_step"] * error
        elif rule == "sign_sgd":
            # (An exact zero, as on selected coordinates, is no ambiguity: sign(0) = 0 on both.)
            ambiguous = (residual.abs() <= error) & (error > 0)
            bound = bound + torch.where(ambiguous, 2.0 * kwargs["residual_step"], 0.0)
        bounds.append(bound.reshape(param.shape))
    return [bounds]


FRUGAL_APPLY = KernelTest(
    cases.FRUGAL_APPLY,
    hparam_ranges={"step_size": (1e-4, 1e-1), "residual_step": (1e-4, 1e-1), "decay": (0.0, 0.1)},
    flags=("maximize",),
    choices={"side": ("left", "right"), "rank": (0, 1, 5, 40), "factor": ("coordinates", "orthonormal"),
             "residual_rule": ("sign_sgd", "sgd", "no"), "batch": ("mixed", "same")},
    max_tensors=3,
    extra_tolerance=_frugal_apply_tolerance,
)


def _frugal_coordinates_tolerance(case: KernelCase) -> list[list[torch.Tensor | float]]:
    """The selection's products are exact, so only Adam's rounding differs (a few ulps of m and v,
    within their dtype's tolerance): N by as much relative to itself, W's selected coordinates by
    η·|ΔN|. φ(G) is exact on both sides (E is G or 0), and the threshold's ‖E‖² ≈ ‖G‖² − ‖R‖²
    may differ by ~1e-16·‖G‖² (the order of a float64 sum): no draw lands that close."""
    params, grads, exp_avgs, exp_avg_sqs, indices = case.args
    kwargs = case.kwargs
    beta1, beta2, eps = kwargs["beta1"], kwargs["beta2"], kwargs["eps"]
    bounds = []
    for param, grad, exp_avg, exp_avg_sq, chosen in zip(params, grads, exp_avgs, exp_avg_sqs, indices):
        m = param.shape[0]
        g = grad.double().reshape(m, -1)
        dim = 1 if kwargs["side"] == "right" else 0
        r = g.index_select(dim, chosen)
        first = beta1 * exp_avg.double() + (1 - beta1) * r.abs()
        second = beta2 * exp_avg_sq.double() + (1 - beta2) * r * r
        # m, v to 8 ulps of float32 each: N moves by 8u·|N| from m and half of v's relative change from √v.
        unit = 8 * 2.0**-24
        n_bound = (first.abs() * unit + first.abs() / (second.sqrt() + eps) * second.sqrt() * unit) / (second.sqrt() + eps)
        bound = torch.zeros_like(g)
        bound.index_copy_(dim, chosen, kwargs["step_size"] * n_bound)
        bounds.append(bound.reshape(param.shape))
    return [bounds, [0.0] * len(params), [0.0] * len(params)]


FRUGAL_COORDINATES = KernelTest(
    cases.FRUGAL_COORDINATES,
    hparam_ranges={"beta1": (0.0, 0.999), "beta2": (0.0, 0.999), "eps": (1e-8, 1e-3), "step_size": (1e-4, 1e-1),
                   "residual_step": (1e-4, 1e-1), "decay": (0.0, 0.1), "residual_threshold": (0.0, 0.9)},
    flags=("maximize",),
    # rank 40 ≥ every drawn side: r = n (the whole matrix selected); rank 0: pure signSGD / SGD.
    choices={"side": ("left", "right"), "rank": (0, 5, 40), "residual_rule": ("sign_sgd", "sgd", "no")},
    max_tensors=2,  # (the Triton twin composes two kernels tested on their own: kept short in the interpreter)
    extra_tolerance=_frugal_coordinates_tolerance,
)


def _no_extra_tolerance(case: KernelCase) -> list[list[float]]:
    return [[0.0] * len(as_list(case.args[i])) for i in case.outputs]


GALORE_ADAMW = KernelTest(
    cases.GALORE_ADAMW,
    hparam_ranges={"step_size": (1e-5, 1e-1), "beta1": (0.0, 0.999), "beta2": (0.0, 0.999), "eps": (1e-8, 1e-3),
                   "lr": (1e-5, 1e-1), "weight_decay": (0.0, 1.0)},
    flags=("maximize", "decay_first"),
    extra_tolerance=_no_extra_tolerance,
)


# ---- Zeroth-order ---------------------------------------------------------------------------

_NORMAL_BOUND = 5.7  # |z| ≤ √(−2·ln 1e-7) for tl.randn's Box–Muller


def _zo_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    """The normals of the interpreter (numpy's log/cos/sin) and of torch differ in the last
    bits; each of the pass's (up to three) roundings may then fall on the other side, one unit
    of the storage dtype at the magnitude of its operands."""
    kwargs = case.kwargs
    unit = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
    extra = []
    for param in case.args[0]:
        step = 0.0
        if "coefficients" in kwargs:
            step = float(kwargs["coefficients"].abs().sum()) * _NORMAL_BOUND
        magnitude = param.double().abs() + kwargs["eps"] * _NORMAL_BOUND + step
        extra.append(4 * unit[param.dtype] * magnitude)
    return [extra]


ZEROTH_ORDER_APPLY = KernelTest(
    cases.ZEROTH_ORDER_APPLY,
    hparam_ranges={"eps": (1e-4, 1e-1), "coefficient": (1e-4, 1e-1), "decay": (0.0, 0.1)},
    flags=("mask", "clamp"),
    choices={"pass": tuple(cases.ZO_PASSES)},
    max_tensors=8,
    extra_tolerance=_zo_tolerance,
)


# ---- COSMOS ---------------------------------------------------------------------------------

def _muon_form_newton_schulz5(matrix: torch.Tensor, *, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """NS5 in Muon's association X ← a·X + (b·A + c·A·A)·X, A = X·Xᵀ, one rounding to ``dtype``
    per product (``mm``/``addmm``, matrix by matrix): how the torch twin rounds, written out
    independently of it, so that its distance from the float64 iteration bounds the twin's."""
    from memzoo.reference.cosmos import NS_COEFFICIENTS, frobenius_normalize

    a, b, c = NS_COEFFICIENTS
    x = frobenius_normalize(matrix.to(dtype), eps=1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if transposed else x


def _orthogonalize_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    """Both sides are bf16 (or fp32) iterations that differ only in rounding: the reference
    rounds after every operation, the Triton kernel once per iteration, the torch twin once per
    product (Muon's association). |actual − reference| ≤ |actual − exact| + |exact − reference|:
    allow the reference's own distance from the float64 iteration, element by element, plus
    the largest of it and the largest distance of Muon's association (computed independently,
    :func:`_muon_form_newton_schulz5`): neither rounding pattern is always the closer one (a
    27×3 fp32 matrix in bf16, singular values 5.3/5.0/3.9: the reference 0.022 from the float64
    iteration, Muon's association 0.033, 0.049 apart), plus one unit of the output dtype."""
    from memzoo.reference.cosmos import newton_schulz5

    matrices, outputs = case.args
    steps = case.kwargs["steps"]
    extra = []
    for matrix, output in zip(matrices, outputs):
        exact = newton_schulz5(matrix.double(), steps=steps, dtype=torch.float64)
        rounded = newton_schulz5(matrix, steps=steps, dtype=output.dtype).double()
        error = (rounded - exact).abs()
        muon_error = (_muon_form_newton_schulz5(matrix, steps=steps, dtype=output.dtype).double() - exact).abs()
        unit = 2.0**-8 if output.dtype == torch.bfloat16 else 2.0**-23
        largest = lambda values: values.max() if values.numel() else 0.0  # noqa: E731
        extra.append(error + largest(error) + largest(muon_error) + unit * largest(exact.abs()))
    return [extra]


COSMOS_ORTHOGONALIZE = KernelTest(
    cases.COSMOS_ORTHOGONALIZE,
    hparam_ranges={},
    flags=(),
    choices={"steps": (0, 1, 5), "batch": ("mixed", "same")},
    max_tensors=3,
    extra_tolerance=_orthogonalize_tolerance,
)


def _cosmos_apply_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    """A few fp32 roundings of the step (its GEMM and ‖D‖ summed in another order) at the
    step's magnitude, on top of the weight's own rounding."""
    param, low_rank, basis, orthogonal = case.args
    m, n = param.shape
    direction = low_rank.double() @ basis.double().T
    if orthogonal is not None:
        direction = direction + case.kwargs["gamma"] * math.sqrt(m * n) * orthogonal.double() / orthogonal.double().norm()
    step = case.kwargs["lr"] * case.kwargs["lr_ratio"] * math.sqrt(m * n) * direction / direction.norm()
    return [[16 * 2.0**-24 * (step.abs() + step.abs().max() + param.double().abs())]]


COSMOS_APPLY = KernelTest(
    cases.COSMOS_APPLY,
    hparam_ranges={"lr": (1e-4, 1e-1), "lr_ratio": (0.05, 1.0), "gamma": (0.0, 1.0), "weight_decay": (0.0, 0.5)},
    flags=(),
    choices={"rank": (0, 1, 5, "full")},
    max_tensors=1,
    extra_tolerance=_cosmos_apply_tolerance,
)


# In the order of memzoo.bench.kernel_cases.KERNELS (test_kernels checks that both name the same kernels).
KERNEL_TESTS: dict[str, KernelTest] = {test.name: test for test in (
    LION, GALORE_PROJECT, GALORE_APPLY, GALORE_ADAMW, APOLLO_SCALES, APOLLO_APPLY, FRUGAL_APPLY, FRUGAL_COORDINATES,
    ZEROTH_ORDER_APPLY, COSMOS_ORTHOGONALIZE, COSMOS_APPLY)}

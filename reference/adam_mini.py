"""Adam-mini (Zhang et al. 2024, "Adam-mini: Use Fewer Learning Rates To Gain More").

Adam with one second-moment value per *block* of parameters instead of one per element: each
block's v is the EMA of the mean of g² over the block, and every element of the block is divided
by that block's √v. Blocks follow the Hessian's block structure of a Transformer (paper §2.3,
Algorithm 2-3), chosen by the parameter's name and shape.

The rules are those of the official package ``adam-mini`` 1.1.1 (``adam_mini.Adam_mini``), which
this module follows where it and the paper differ. A parameter's name is lowercased and the first
matching rule applies (substring matches, in this order):

1. ``"bias"`` in the name → ``"element"``: plain Adam, one block per element.
2. a query / key name (``k_proj``, ``q_proj``, ``wq``, ``wk``, ``query``, ``key``) → ``"head"``:
   one block per attention head, i.e. per ``dim²/n_heads`` consecutive elements (``dim²/n_heads``
   = ``head_dim · dim``, one head's rows of a (out, in = dim) weight). A key projection with
   fewer heads (grouped-query attention) simply has fewer such blocks: ``n_kv_heads`` is only
   checked to divide ``n_heads``, as in 1.1.1.
3. an embedding (``embed``, ``embd``, ``wte``), output head (``lm_head``, ``output``,
   ``final_layer``), value (``v_proj``, ``wv``, ``value``), attention output (``o_proj``, ``wo``,
   ``attn.proj``) or MLP (``feed_forward``, ``linear``, ``mlp``) name → ``"row"``: one block per
   row (per token of an embedding / head, per output neuron of a Linear weight).
4. anything else (norms, unnamed parameters, names matching no rule) → ``"tensor"``: one block.

Extra fragments per rule (``block_names``: 1.1.1's ``optimizer.wqk_names.add(...)`` and the
like) join these sets; see :func:`block_rule`.

Where this module differs from 1.1.1 (each a case where 1.1.1 raises or has no defined result):

- a ``"row"`` parameter with fewer than 2 dimensions (e.g. a 1-D ``mlp.norm.weight``) is one
  ``"tensor"`` block (1.1.1 fails with an IndexError in ``mean(dim=1)``); one with more than 2
  dimensions has one block per index of its first dimension (1.1.1 fails in ``view``);
- a ``"head"`` parameter whose size is not a whole number of heads raises a ValueError naming
  it (1.1.1 fails in ``view``); a parameter of 0 elements is left as it is (1.1.1 writes NaN
  into its v).

Everything else is 1.1.1's math: ``m`` and ``v`` start at 0; with t the step count after this
step, bias corrections bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ; decoupled weight decay W ← W·(1 − lr·λ)
before the update, and none for parameters whose name contains ``"norm"``, ``"ln"`` or
``"bias"`` (:func:`decays`); defaults lr = 1e-3, betas = (0.9, 0.999), eps = 1e-8 (1.1.1's
docstring says 1e-6; its code uses 1e-8), weight_decay = 0, dim = 2048, n_heads = 32. Nothing is
special about embedding rows whose gradient is zero (tokens absent from the batch): their v
decays by β2 and their m by β1, and they still move by m / √v, as in 1.1.1 and in Adam.

Math in float32 (float64 when an input is float64), one rounding to the storage dtype at the end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from memzoo.reference.common import as_tensor_list, check_parallel_lists, compute_dtype

__all__ = ["BlockPartition", "RULES", "adam_mini_blocks", "adam_mini_update_", "block_rule", "check_block_lists", "check_block_names",
           "decays", "partition"]

Rule = Literal["element", "head", "row", "tensor"]
RULES: tuple[str, ...] = ("element", "head", "row", "tensor")

# adam-mini 1.1.1's name fragments (Adam_mini.__init__), matched as substrings of the lowercased name.
ELEMENT_NAMES = ("bias",)
HEAD_NAMES = ("k_proj", "q_proj", "wq", "wk", "query", "key")
ROW_NAMES = (
    "embed", "embd", "wte",  # embeddings: one block per token
    "lm_head", "output", "final_layer",  # output heads: one block per token
    "v_proj", "wv", "value",  # values: one block per output neuron
    "o_proj", "wo", "attn.proj",  # attention output projections: per output neuron
    "feed_forward", "linear", "mlp",  # MLPs: per output neuron
)
# Names whose parameters take no weight decay in 1.1.1 (its per-parameter groups).
NO_DECAY_NAMES = ("norm", "ln", "bias")


@dataclass(frozen=True)
class BlockPartition:
    """How a parameter is cut into blocks: ``blocks`` runs of ``block_numel`` consecutive
    elements in row-major order of its shape (blocks · block_numel = numel); one v per block."""

    rule: Rule
    blocks: int
    block_numel: int


# Extra name fragments per rule, e.g. {"head": ("c_q", "c_k")}: 1.1.1's advice for names it does
# not know is to add them to its sets (``optimizer.wqk_names.add(...)``).
BlockNames = Mapping[str, Sequence[str]]


def check_block_names(block_names: Any) -> None:
    """Raise unless ``block_names`` is None or a dict from rule names to lists of non-empty strings."""
    if block_names is None:
        return
    if not isinstance(block_names, Mapping) or not set(block_names) <= set(RULES):
        raise ValueError(f"Invalid block_names: {block_names!r} (expected None or a dict from rules {RULES} to lists "
                         "of name fragments, e.g. {'head': ['c_q', 'c_k']})")
    for rule, fragments in block_names.items():
        if (not isinstance(fragments, (list, tuple)) or not fragments
                or not all(isinstance(f, str) and f for f in fragments)):
            raise ValueError(f"Invalid block_names[{rule!r}]: {fragments!r} (expected a list of non-empty strings)")


def block_rule(name: str | None, block_names: BlockNames | None = None) -> Rule:
    """The rule 1.1.1 applies to a parameter called ``name`` (None: no name, the default rule).

    ``block_names`` adds fragments to 1.1.1's sets (as its users do with
    ``optimizer.wqk_names.add(...)``), matched in 1.1.1's order: element, head, row. Its
    ``"tensor"`` fragments are tried after the element ones and before the others: a way to
    take a name out of 1.1.1's head / row sets (biases stay per element, as in 1.1.1)."""
    if name is None:
        return "tensor"
    name = name.lower()
    extra = block_names or {}
    for rule, fragments in (("element", ELEMENT_NAMES), ("tensor", ()), ("head", HEAD_NAMES), ("row", ROW_NAMES)):
        if any(fragment in name for fragment in (*fragments, *(f.lower() for f in extra.get(rule, ())))):
            return rule
    return "tensor"


def decays(name: str | None) -> bool:
    """Whether weight decay applies to a parameter called ``name`` (1.1.1: not to norms and biases)."""
    return name is None or not any(fragment in name.lower() for fragment in NO_DECAY_NAMES)


def partition(name: str | None, shape: Sequence[int], *, dim: int, n_heads: int,
              block_names: BlockNames | None = None) -> BlockPartition:
    """The blocks of a parameter called ``name`` of ``shape`` (see the module docstring and
    :func:`block_rule`); a ValueError names the parameter when a ``"head"`` parameter is not a
    whole number of heads."""
    numel = math.prod(shape)
    rule = block_rule(name, block_names)
    if rule == "row" and len(shape) < 2:
        rule = "tensor"
    if numel == 0:
        return BlockPartition(rule, 1, 0)
    if rule == "element":
        return BlockPartition(rule, numel, 1)
    if rule == "row":
        return BlockPartition(rule, shape[0], numel // shape[0])
    if rule == "head":
        if (dim * dim) % n_heads:
            raise ValueError(f"dim² = {dim * dim} is not divisible by n_heads = {n_heads} (parameter {name!r}); "
                             "pass the model's hidden size as dim and its number of attention heads as n_heads")
        head_numel = dim * dim // n_heads
        if numel % head_numel:
            raise ValueError(
                f"parameter {name!r} of shape {tuple(shape)} ({numel} elements) is not a whole number of attention "
                f"heads of dim²/n_heads = {dim}²/{n_heads} = {head_numel} elements; pass the model's hidden size as "
                "dim and its number of attention heads as n_heads (Adam-mini's defaults are 2048 and 32)")
        return BlockPartition(rule, numel // head_numel, head_numel)
    return BlockPartition(rule, 1, numel)


def check_block_lists(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                      exp_avg_sqs: list[torch.Tensor], step: int) -> None:
    """Raise unless the lists fit together: params, grads and exp_avgs of equal shapes, each
    exp_avg_sq a floating-point vector of as many blocks as cut its parameter into equal runs,
    and a step count ≥ 1."""
    check_parallel_lists(params=params, grads=grads, exp_avgs=exp_avgs)
    if len(exp_avg_sqs) != len(params):
        raise ValueError(f"tensor lists differ in length: params {len(params)}, exp_avg_sqs {len(exp_avg_sqs)}")
    for index, (param, exp_avg_sq) in enumerate(zip(params, exp_avg_sqs)):
        blocks = exp_avg_sq.numel()
        if (exp_avg_sq.dim() != 1 or not exp_avg_sq.is_floating_point() or exp_avg_sq.device != param.device
                or blocks == 0 or param.numel() % blocks):
            raise ValueError(
                f"exp_avg_sqs[{index}] must be a floating-point vector on {param.device} with one value per block of "
                f"params[{index}] ({param.numel()} elements, so a divisor of it ≥ 1), got {tuple(exp_avg_sq.shape)} "
                f"{exp_avg_sq.dtype} on {exp_avg_sq.device}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be the step count after this step, an int ≥ 1, got {step!r}")


@torch.no_grad()
def adam_mini_update_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    maximize: bool = False,
) -> None:
    """One Adam-mini step on each (param, grad, exp_avg, exp_avg_sq); updates params, exp_avgs
    and exp_avg_sqs in place.

    ``exp_avg_sq`` holds one v per block: a vector of B values cuts its parameter into B blocks
    of numel/B consecutive elements in row-major order of the parameter's shape (B = 1: one
    block, B = numel: Adam). ``step`` is t, the step count including this step (the same for the
    whole list). Tensors may have any shape and strides.
    """
    params = as_tensor_list("params", params)
    grads = as_tensor_list("grads", grads)
    exp_avgs = as_tensor_list("exp_avgs", exp_avgs)
    exp_avg_sqs = as_tensor_list("exp_avg_sqs", exp_avg_sqs)
    check_block_lists(params, grads, exp_avgs, exp_avg_sqs, step)
    hparams = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        if param.numel() == 0:
            continue
        dtype = compute_dtype(param.dtype, grad.dtype, exp_avg.dtype, exp_avg_sq.dtype)
        blocks = exp_avg_sq.numel()
        g = grad.to(dtype).reshape(blocks, -1)  # row b: the elements of block b
        if maximize:
            g = -g
        p, m, v = adam_mini_blocks(param.to(dtype).reshape(blocks, -1), g, exp_avg.to(dtype).reshape(blocks, -1),
                                   exp_avg_sq.to(dtype), (g * g).mean(dim=1), **hparams)
        param.copy_(p.reshape(param.shape))
        exp_avg.copy_(m.reshape(exp_avg.shape))
        exp_avg_sq.copy_(v)


def adam_mini_blocks(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, square_means: torch.Tensor, *,
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                     first_block: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam-mini's update of blocks laid out as rows, in the compute dtype: v and
    ``square_means`` (the mean of g² over each whole block) of shape (blocks,) for every block;
    p, g, m of shape (k, block elements) for blocks ``first_block`` to ``first_block + k − 1``
    (g already negated when maximizing). Returns the new (p, m, v). The one statement of the
    math, shared by :func:`adam_mini_update_` (all blocks) and the FSDP2 step (a rank's blocks,
    whose means come from sums over the shards when a block spans ranks)."""
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    p = p * (1.0 - lr * weight_decay)  # W ← W·(1 − lr·λ), decoupled decay
    m = beta1 * m + (1.0 - beta1) * g  # m ← β1·m + (1 − β1)·g (Algorithm 1, line 6)
    v = beta2 * v + (1.0 - beta2) * square_means  # v_b ← β2·v_b + (1 − β2)·mean_{i∈b} g_i² (line 7)
    denominator = v.sqrt() / bias_correction2_sqrt + eps  # √(v_b / bc2) + ε
    denominator = denominator[first_block: first_block + p.shape[0], None]
    p = p - (lr / bias_correction1) * m / denominator  # W ← W − lr·(m / bc1) / (√(v_b/bc2) + ε)
    return p, m, v

"""Adam-mini: the reference against hand-derived values and its invariants, the torch path against
the reference, and the optimizer's trajectory against the official ``adam-mini`` 1.1.1 package on
small Transformers with the official parameter names (LLaMA-style and GPT-2-style)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import assert_close, log_uniform, official_package

from memzoo.optim import AdamMini
from memzoo.reference import adam_mini as reference
from memzoo.triton_kernels.torch_backend import adam_mini as fast
from memzoo.triton_kernels.torch_backend import elementwise

HPARAMS = dict(lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


# -- the partition -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,rule", [
    # LLaMA / Hugging Face names
    ("model.embed_tokens.weight", "row"), ("model.layers.0.self_attn.q_proj.weight", "head"),
    ("model.layers.0.self_attn.k_proj.weight", "head"), ("model.layers.0.self_attn.v_proj.weight", "row"),
    ("model.layers.0.self_attn.o_proj.weight", "row"), ("model.layers.0.mlp.gate_proj.weight", "row"),
    ("model.layers.0.input_layernorm.weight", "tensor"), ("model.norm.weight", "tensor"), ("lm_head.weight", "row"),
    # GPT-2 / nanoGPT names: the fused c_attn and attn.c_proj match no 1.1.1 rule
    ("transformer.wte.weight", "row"), ("transformer.wpe.weight", "tensor"), ("transformer.h.0.ln_1.weight", "tensor"),
    ("transformer.h.0.attn.c_attn.weight", "tensor"), ("transformer.h.0.attn.c_proj.weight", "tensor"),
    ("transformer.h.0.mlp.c_fc.weight", "row"), ("transformer.h.0.mlp.c_proj.weight", "row"),
    # Meta LLaMA names, BERT names, case
    ("layers.0.attention.wq.weight", "head"), ("layers.0.attention.wo.weight", "row"),
    ("layers.0.feed_forward.w1.weight", "row"), ("output.weight", "row"), ("tok_embeddings.weight", "row"),
    ("bert.encoder.layer.0.attention.self.Query.weight", "head"),
    # precedence: bias before heads, heads before rows
    ("model.layers.0.self_attn.q_proj.bias", "element"), ("mlp.key_gate.weight", "head"), (None, "tensor"),
])
def test_block_rules_follow_the_official_names(name, rule) -> None:
    assert reference.block_rule(name) == rule


def test_name_fragments_equal_the_official_sets() -> None:
    official = official_package("adam_mini").Adam_mini(
        [("w", torch.nn.Parameter(torch.zeros(2, 2)))], dim=2, n_heads=1, verbose=False)
    assert set(reference.ELEMENT_NAMES) == official.adam_block_names
    assert set(reference.HEAD_NAMES) == official.wqk_names
    assert set(reference.ROW_NAMES) == (official.embd_names | official.output_names | official.wv_names
                                       | official.attn_proj_names | official.mlp_names)


def test_partition_shapes_and_decay() -> None:
    part = reference.partition
    assert part("q_proj.weight", (8, 8), dim=8, n_heads=4) == reference.BlockPartition("head", 4, 16)
    assert part("k_proj.weight", (4, 8), dim=8, n_heads=4) == reference.BlockPartition("head", 2, 16)  # GQA
    assert part("lm_head.weight", (11, 8), dim=8, n_heads=4) == reference.BlockPartition("row", 11, 8)
    assert part("mlp.conv.weight", (3, 4, 5), dim=8, n_heads=4) == reference.BlockPartition("row", 3, 20)
    assert part("mlp.scale", (6,), dim=8, n_heads=4) == reference.BlockPartition("tensor", 1, 6)  # 1.1.1: IndexError
    assert part("v_proj.bias", (6,), dim=8, n_heads=4) == reference.BlockPartition("element", 6, 1)
    assert part("norm.weight", (0,), dim=8, n_heads=4).blocks == 1
    extra = {"head": ["C_Q"], "tensor": ["v_proj"]}
    assert part("attn.c_q.weight", (8, 8), dim=8, n_heads=4, block_names=extra) == reference.BlockPartition("head", 4, 16)
    assert part("v_proj.weight", (8, 8), dim=8, n_heads=4, block_names=extra).rule == "tensor"
    assert part("v_proj.bias", (8,), dim=8, n_heads=4, block_names=extra).rule == "element"
    with pytest.raises(ValueError, match=r"'q_proj.weight' of shape \(5, 8\).*whole number of attention heads"):
        part("q_proj.weight", (5, 8), dim=8, n_heads=4)
    assert [reference.decays(n) for n in ("h.0.ln_1.weight", "norm.weight", "v_proj.bias", "mlp.c_fc.weight", None)] \
        == [False, False, False, True, True]


# -- the reference's math ------------------------------------------------------------------------

def test_hand_derived_first_step() -> None:
    # One block g = (3, 4): mean g² = 12.5; after bias correction m̂ = g, v̂ = 12.5, so with
    # decay 1 − 0.1·0.5 the weight becomes 0.95·W − 0.1·g/(√12.5 + ε).
    param = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    grad = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros(1, dtype=torch.float64)
    reference.adam_mini_update_(param, grad, exp_avg, exp_avg_sq, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                                weight_decay=0.5, step=1)
    expected = torch.tensor([[0.95 - 0.3 / (math.sqrt(12.5) + 1e-8), -1.9 - 0.4 / (math.sqrt(12.5) + 1e-8)]],
                            dtype=torch.float64)
    torch.testing.assert_close(param, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(exp_avg, 0.1 * grad, rtol=1e-15, atol=0)
    torch.testing.assert_close(exp_avg_sq, torch.tensor([0.01 * 12.5], dtype=torch.float64), rtol=1e-15, atol=0)


def test_blocks_of_one_element_are_adamw() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    ours, theirs = weight.clone(), torch.nn.Parameter(weight.clone())
    adamw = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    exp_avg, exp_avg_sq = torch.zeros_like(ours), torch.zeros(15, dtype=torch.float64)
    for step in range(1, 6):
        grad = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        theirs.grad = grad
        adamw.step()
        reference.adam_mini_update_(ours, grad, exp_avg, exp_avg_sq, step=step, **HPARAMS)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-13, atol=1e-15)


def test_second_moment_is_the_ema_of_block_means_and_equal_magnitudes_are_adam() -> None:
    generator = torch.Generator().manual_seed(1)
    blocks, block_numel = 4, 6
    param = torch.randn(blocks, block_numel, generator=generator, dtype=torch.float64)
    adam_param = param.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros(blocks, dtype=torch.float64)
    adam_m, adam_v = torch.zeros_like(param), torch.zeros_like(param)
    expected_v = torch.zeros(blocks, dtype=torch.float64)
    for step in range(1, 5):
        # Within a block every |g_i| is the same: the block mean of g² is each element's g², so
        # Adam-mini takes Adam's step exactly.
        magnitude = torch.rand(blocks, 1, generator=generator, dtype=torch.float64) + 0.1
        signs = torch.randint(0, 2, (blocks, block_numel), generator=generator).double() * 2 - 1
        grad = magnitude * signs
        reference.adam_mini_update_(param, grad, exp_avg, exp_avg_sq, step=step, **HPARAMS)
        reference.adam_mini_update_(adam_param, grad, adam_m, adam_v.view(-1), step=step, **HPARAMS)
        expected_v = 0.95 * expected_v + 0.05 * (grad**2).mean(dim=1)
    torch.testing.assert_close(exp_avg_sq, expected_v, rtol=1e-14, atol=0)
    torch.testing.assert_close(param, adam_param, rtol=1e-13, atol=1e-15)


def test_maximize_equals_negated_gradient_and_bad_lists_raise() -> None:
    generator = torch.Generator().manual_seed(2)
    p1, g, m1 = (torch.randn(6, 4, generator=generator) for _ in range(3))
    v1 = torch.rand(3, generator=generator)
    p2, m2, v2 = p1.clone(), m1.clone(), v1.clone()
    reference.adam_mini_update_(p1, g, m1, v1, step=3, maximize=True, **HPARAMS)
    reference.adam_mini_update_(p2, -g, m2, v2, step=3, **HPARAMS)
    assert torch.equal(p1, p2) and torch.equal(m1, m2) and torch.equal(v1, v2)
    for backend in (reference, fast):
        with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] must be .* divisor"):
            backend.adam_mini_update_(p1, g, m1, torch.zeros(5), step=1, **HPARAMS)
        with pytest.raises(ValueError, match="step must be"):
            backend.adam_mini_update_(p1, g, m1, v1, step=0, **HPARAMS)


# -- the torch path against the reference --------------------------------------------------------

@st.composite
def block_cases(draw):
    shape = tuple(draw(st.integers(1, 9)) for _ in range(draw(st.integers(1, 3))))
    numel = math.prod(shape)
    blocks = draw(st.sampled_from([d for d in range(1, numel + 1) if numel % d == 0]))
    return shape, blocks


@settings(max_examples=25)
@given(cases=st.lists(block_cases(), min_size=1, max_size=3), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       lr=log_uniform(1e-4, 0.1), beta1=st.floats(0, 0.99), beta2=st.floats(0.5, 0.999), step=st.integers(1, 50),
       maximize=st.booleans(), chunk=st.sampled_from([4, 16, 1 << 17]), seed=st.integers(0, 2**31 - 1))
def test_torch_path_matches_the_reference(cases, dtype, lr, beta1, beta2, step, maximize, chunk, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for shape, blocks in cases:
        param, grad, exp_avg = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
        tensors.append((param, grad, exp_avg, torch.rand(blocks, generator=generator)))
    hparams = dict(lr=lr, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=0.1, step=step, maximize=maximize)
    expected = [[t.clone() for t in ts] for ts in tensors]
    actual = [[t.clone() for t in ts] for ts in tensors]
    reference.adam_mini_update_(*map(list, zip(*expected)), **hparams)
    original = elementwise.CHUNK
    elementwise.CHUNK = chunk  # small chunks: runs of a few blocks, and blocks larger than a chunk
    try:
        fast.adam_mini_update_(*map(list, zip(*actual)), **hparams)
    finally:
        elementwise.CHUNK = original
    for a_list, e_list in zip(actual, expected):
        for what, a, e in zip(("param", "grad", "exp_avg", "exp_avg_sq"), a_list, e_list):
            # Block sums in another order: v within a few fp32 roundings of the sum (the weight's
            # step, lr·m/√v, then within half that, relative); m and the weight rounded once.
            extra = {"exp_avg_sq": 1e-5 * e.abs(), "param": 1e-5 * lr}.get(what, 0.0)
            assert_close(a, e, extra, what=what)


def test_torch_path_takes_views_to_the_reference() -> None:
    generator = torch.Generator().manual_seed(3)
    param = torch.randn(6, 4, generator=generator).t()  # not contiguous
    grad, exp_avg = torch.randn(4, 6, generator=generator), torch.zeros(4, 6)
    exp_avg_sq = torch.zeros(4)
    expected = [param.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    reference.adam_mini_update_(expected[0], grad, expected[1], expected[2], step=1, **HPARAMS)
    fast.adam_mini_update_(param, grad, exp_avg, exp_avg_sq, step=1, **HPARAMS)
    assert torch.equal(param, expected[0]) and torch.equal(exp_avg_sq, expected[2])


# -- the optimizer against adam-mini 1.1.1 ---------------------------------------------------------

VOCAB, DIM, HEADS, KV_HEADS = 13, 8, 4, 2


class _LlamaLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        head_dim = DIM // HEADS
        self.self_attn = torch.nn.ModuleDict({
            "q_proj": torch.nn.Linear(DIM, DIM, bias=False), "k_proj": torch.nn.Linear(DIM, KV_HEADS * head_dim, bias=False),
            "v_proj": torch.nn.Linear(DIM, KV_HEADS * head_dim, bias=True), "o_proj": torch.nn.Linear(DIM, DIM, bias=False)})
        self.mlp = torch.nn.ModuleDict({"gate_proj": torch.nn.Linear(DIM, 12, bias=False),
                                        "down_proj": torch.nn.Linear(12, DIM, bias=False)})
        self.input_layernorm = torch.nn.LayerNorm(DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        attn, z = self.self_attn, self.input_layernorm(h)
        repeat = HEADS // KV_HEADS
        q, k, v = attn["q_proj"](z), attn["k_proj"](z).repeat(1, 1, repeat), attn["v_proj"](z).repeat(1, 1, repeat)
        scores = (q.unflatten(-1, (HEADS, -1)) * k.unflatten(-1, (HEADS, -1))).sum(-1).softmax(dim=1)
        h = h + attn["o_proj"]((scores.unsqueeze(-1) * v.unflatten(-1, (HEADS, -1))).flatten(-2))
        return h + self.mlp["down_proj"](torch.nn.functional.silu(self.mlp["gate_proj"](h)))


class TinyLlama(torch.nn.Module):
    """LLaMA's parameter names (model.embed_tokens, self_attn.{q,k,v,o}_proj, mlp, norms,
    lm_head) with grouped-query attention: every 1.1.1 rule appears."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(VOCAB, DIM),
                                          "layers": torch.nn.ModuleList([_LlamaLayer(), _LlamaLayer()]),
                                          "norm": torch.nn.LayerNorm(DIM)})
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.model["embed_tokens"](tokens)
        for layer in self.model["layers"]:
            h = layer(h)
        return self.lm_head(self.model["norm"](h))


class TinyGPT2(torch.nn.Module):
    """GPT-2's names (wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, ln_f)."""

    def __init__(self) -> None:
        super().__init__()
        block = torch.nn.ModuleDict({"ln_1": torch.nn.LayerNorm(DIM), "attn": torch.nn.ModuleDict({
            "c_attn": torch.nn.Linear(DIM, 3 * DIM), "c_proj": torch.nn.Linear(DIM, DIM)}),
            "mlp": torch.nn.ModuleDict({"c_fc": torch.nn.Linear(DIM, 16), "c_proj": torch.nn.Linear(16, DIM)})})
        self.transformer = torch.nn.ModuleDict({"wte": torch.nn.Embedding(VOCAB, DIM), "wpe": torch.nn.Embedding(6, DIM),
                                                "h": torch.nn.ModuleList([block]), "ln_f": torch.nn.LayerNorm(DIM)})
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        h = t["wte"](tokens) + t["wpe"](torch.arange(tokens.shape[1]))
        for block in t["h"]:
            q, k, v = block["attn"]["c_attn"](block["ln_1"](h)).chunk(3, dim=-1)
            h = h + block["attn"]["c_proj"](q.tanh() * k + v)
            h = h + block["mlp"]["c_proj"](torch.nn.functional.gelu(block["mlp"]["c_fc"](h)))
        return self.lm_head(t["ln_f"](h))


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 4) -> None:
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        # 8 of 13 tokens per batch: some embedding rows get zero gradients on some steps.
        tokens = torch.randint(0, 8, (2, 5), generator=generator) + torch.randint(0, 6, (1,), generator=generator)
        targets = torch.randint(0, VOCAB, (2, 5), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()


def _official_run(model_class, edit=lambda optimizer: None, **kwargs):
    official = official_package("adam_mini")
    torch.manual_seed(0)
    model = model_class().double()
    start = copy.deepcopy(model)
    optimizer = official.Adam_mini(model.named_parameters(), verbose=False, **kwargs)
    edit(optimizer)  # 1.1.1's way to map other names: edit its name sets before the first step
    _train(model, optimizer)
    return start, model, optimizer


OFFICIAL_SETTINGS = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, dim=DIM, n_heads=HEADS,
                         n_kv_heads=KV_HEADS)


@pytest.mark.parametrize("model_class", [TinyLlama, TinyGPT2])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_trajectory_matches_the_official_package(model_class, backend) -> None:
    start, expected, official = _official_run(model_class, **OFFICIAL_SETTINGS)
    model = copy.deepcopy(start)
    optimizer = AdamMini(model.named_parameters(), **OFFICIAL_SETTINGS, backend=backend)
    _train(model, optimizer)
    for (name, ours), theirs in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14, msg=name)
        # One second moment per official block, equal to the official one.
        official_v = official.state[theirs].get("vmean", official.state[theirs].get("v"))
        torch.testing.assert_close(optimizer.state[ours]["exp_avg_sq"], official_v.reshape(-1), rtol=1e-12,
                                   atol=1e-20, msg=name)


@pytest.mark.parametrize("model_class,block_names,edit", [
    # GPT-2's fused c_attn per output neuron, as 1.1.1 does once "c_attn" joins its MLP names
    (TinyGPT2, {"row": ["C_Attn"]}, lambda optimizer: optimizer.mlp_names.add("c_attn")),
    # values back to one block each, as 1.1.1 does with its value names removed
    (TinyLlama, {"tensor": ["v_proj"]}, lambda optimizer: optimizer.wv_names.clear()),
], ids=["gpt2-c_attn-rows", "llama-v-tensor"])
def test_block_names_follow_the_official_name_sets(model_class, block_names, edit) -> None:
    start, expected, _ = _official_run(model_class, edit, **OFFICIAL_SETTINGS)
    model = copy.deepcopy(start)
    optimizer = AdamMini(model.named_parameters(), **OFFICIAL_SETTINGS, block_names=block_names, backend="torch")
    _train(model, optimizer)
    for (name, ours), theirs in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14, msg=name)
    (rule, fragments), = block_names.items()
    moved = [moved_rule for _, name, moved_rule, _ in optimizer.block_partitions()
             if name.endswith("weight") and any(fragment.lower() in name for fragment in fragments)]
    assert moved and set(moved) == {rule}  # (their biases stay per element, as in 1.1.1)


def test_a_wrong_partition_leaves_the_official_trajectory() -> None:
    """The trajectory test can see the partition: two heads' worth of rows per block for the
    queries and keys (n_heads = 2 instead of 4), or no names at all (one block per tensor), move the weights away from 1.1.1's by far more than its
    tolerance."""
    start, expected, _ = _official_run(TinyLlama, **OFFICIAL_SETTINGS)
    for settings_, named in (({**OFFICIAL_SETTINGS, "n_heads": 2, "n_kv_heads": 1}, True), (OFFICIAL_SETTINGS, False)):
        model = copy.deepcopy(start)
        params = model.named_parameters() if named else model.parameters()
        with pytest.warns(UserWarning, match="without names") if not named else _no_warning():
            optimizer = AdamMini(params, **settings_, backend="torch")
        _train(model, optimizer)
        gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), expected.parameters()))
        assert gap > 1e-4, (settings_, named, gap)


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


# -- the optimizer's own contract --------------------------------------------------------------

def test_constructor_errors_name_the_problem_before_anything_changes() -> None:
    model = TinyLlama()
    with pytest.raises(ValueError, match=r"param group 0: dim² = 64 is not divisible by n_heads = 3 \(parameter "
                                         r"'model.layers.0.self_attn.q_proj.weight'\)"):
        AdamMini(model.named_parameters(), dim=8, n_heads=3)
    with pytest.raises(ValueError, match=r"param group 0: parameter 'model.layers.0.self_attn.k_proj.weight' of shape "
                                         r"\(4, 8\) .* dim²/n_heads = 16²/4 = 64 elements"):
        AdamMini(model.named_parameters(), dim=16, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads: 3 does not divide n_heads = 4"):
        AdamMini(model.named_parameters(), dim=8, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="Invalid dim"):
        AdamMini(model.named_parameters(), dim=0, n_heads=4)
    with pytest.raises(TypeError, match="once"):
        AdamMini(model.parameters(), named_parameters=model.named_parameters())
    with pytest.raises(ValueError, match="adam_mini has no Triton kernels"):
        AdamMini(model.named_parameters(), dim=8, n_heads=4, backend="triton")
    assert type(AdamMini(named_parameters=model.named_parameters(), dim=8, n_heads=4)._kernels(
        torch.device("cpu"))).__name__ == "module"


def test_named_checkpoint_resumes_bit_identically() -> None:
    torch.manual_seed(0)
    model = TinyLlama()
    resumed_model = copy.deepcopy(model)
    optimizer = AdamMini(model.named_parameters(), **OFFICIAL_SETTINGS, backend="torch")
    _train(model, optimizer, steps=2)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_model.load_state_dict(model.state_dict())
    resumed = AdamMini(resumed_model.named_parameters(), **OFFICIAL_SETTINGS, backend="torch")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _train(model, optimizer, steps=2)
    _train(resumed_model, resumed, steps=2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    # dim and n_heads are group settings: a checkpoint brings its own, with the state that fits them
    # (as torch.optim restores every hyperparameter of a group).
    other = AdamMini(copy.deepcopy(model).named_parameters(), **{**OFFICIAL_SETTINGS, "n_heads": 2, "n_kv_heads": 1})
    other.load_state_dict(optimizer.state_dict())
    assert other.param_groups[0]["n_heads"] == HEADS
    names = {name: (rule, blocks) for _, name, rule, blocks in optimizer.block_partitions()}
    assert names["model.layers.0.self_attn.k_proj.weight"] == ("head", KV_HEADS)
    assert names["model.embed_tokens.weight"] == ("row", VOCAB)
    assert optimizer.state_bytes() == sum(8 + p.numel() * 4 + 4 * optimizer._partition(p, g)[0].blocks
                                          for g in optimizer.param_groups for p in g["params"])


def test_layerwise_keeps_the_names_and_the_partition() -> None:
    from memzoo.optim import LayerwiseOptimizer, create_optimizer

    torch.manual_seed(0)
    model = TinyLlama()
    twin = copy.deepcopy(model)
    settings_ = {key: value for key, value in OFFICIAL_SETTINGS.items() if key != "weight_decay"}
    layerwise = create_optimizer(model, "adam_mini", layerwise=True, backend="torch", **settings_)
    ordinary = create_optimizer(twin, "adam_mini", backend="torch", **settings_)
    assert isinstance(layerwise, LayerwiseOptimizer)
    assert [rule for inner in layerwise.inner_optimizers for _, _, rule, _ in inner.block_partitions()] == [
        rule for _, _, rule, _ in ordinary.block_partitions()]
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(tokens).square().mean().backward()
        layerwise.step()
        twin(tokens).square().mean().backward()
        ordinary.step()
        ordinary.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)

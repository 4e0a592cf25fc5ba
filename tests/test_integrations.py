"""The trainers people use, for real (the ``integrations`` extra, which .ci/run installs): the
Hugging Face Trainer, accelerate, PyTorch Lightning and PEFT-LoRA train a tiny LlamaForCausalLM
built from a config (no downloads) with every optimizer family, layer-wise mode in every client:
the loss falls, a resumed run equals the uninterrupted one, the lr follows the schedule, and
clipping clips (or, in layer-wise mode, the trainer's global-norm clip raises and says what to do)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_MISSING = 'needs the integrations extra: pip install -e ".[integrations]"'
transformers = pytest.importorskip("transformers", reason=_MISSING)
accelerate = pytest.importorskip("accelerate", reason=_MISSING)
lightning = pytest.importorskip("lightning", reason=_MISSING)
peft = pytest.importorskip("peft", reason=_MISSING)

import memzoo  # noqa: E402
from memzoo.optim import LayerwiseOptimizer  # noqa: E402

VOCAB, LENGTH, BATCH = 32, 12, 8
SMALL_LR = dict(galore_adamw=2e-2, natural_galore=2e-2, apollo=2e-2, frugal=2e-2, cosmos=2e-2, lion=3e-3)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH)
    return transformers.LlamaForCausalLM(config)


class _Counting(torch.utils.data.Dataset):
    """One batch of counting sequences (t, t+1, ...): learnable in a few steps."""

    def __len__(self) -> int:
        return BATCH

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(LENGTH) + 3 * index) % VOCAB
        return {"input_ids": ids, "labels": ids}


def _batch() -> dict[str, torch.Tensor]:
    data = _Counting()
    return {key: torch.stack([data[i][key] for i in range(len(data))]) for key in ("input_ids", "labels")}


def _optimizer(model: torch.nn.Module, name: str, layerwise: bool, **kwargs) -> torch.optim.Optimizer:
    low_rank = {} if name == "lion" else ({"density": 0.5} if name == "frugal" else {"rank": 4})
    return memzoo.create_optimizer(model, name, lr=SMALL_LR[name], layerwise=layerwise, backend="torch",
                                   **low_rank, **kwargs)


def _inner_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The lr each update reads: the inner optimizers' groups in layer-wise mode."""
    groups = ([inner.param_groups[0] for inner in optimizer.inner_optimizers]
              if isinstance(optimizer, LayerwiseOptimizer) else optimizer.param_groups)
    return [group["lr"] for group in groups]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- Hugging Face Trainer ------------------------------------------------------------------------

def _hf_trainer(tmp_path, model, optimizer, steps: int, *, warmup: int, max_grad_norm: float = 0.0,
                callbacks=()) -> transformers.Trainer:
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup,
                                                            num_training_steps=steps)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH, logging_steps=1,
        save_strategy="steps", save_steps=3, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        max_grad_norm=max_grad_norm, dataloader_num_workers=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Counting(), optimizers=(optimizer, schedule),
                                callbacks=list(callbacks))


@pytest.mark.parametrize("name,layerwise", [("galore_adamw", True), ("apollo", False)])
def test_hf_trainer_trains_follows_the_schedule_and_resumes_exactly(tmp_path, name: str, layerwise: bool) -> None:
    steps, warmup = 6, 2
    model = _tiny_llama()
    optimizer = _optimizer(model, name, layerwise)
    trainer = _hf_trainer(tmp_path, model, optimizer, steps, warmup=warmup)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.05
    # Linear warmup then decay, as logged and as read by the updates (the groups the updates use).
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    peak = SMALL_LR[name]
    expected = [peak * min(step / warmup, (steps - step) / (steps - warmup)) for step in range(steps)]
    assert logged == pytest.approx(expected)
    assert _inner_lrs(optimizer) == pytest.approx([trainer.lr_scheduler.get_last_lr()[0]] * len(_inner_lrs(optimizer)))
    assert all(entry["grad_norm"] > 0.1 for entry in trainer.state.log_history if "grad_norm" in entry)  # was 0.0

    resumed_model = _tiny_llama()
    resumed = _hf_trainer(tmp_path / "resumed", resumed_model, _optimizer(resumed_model, name, layerwise), steps,
                          warmup=warmup)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert _same_weights(model, resumed_model)


def test_hf_trainer_clips_and_layerwise_refuses_its_global_clip_clearly(tmp_path) -> None:
    norms_seen_by_the_step = []

    class RecordNorm(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norms_seen_by_the_step.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))

    model = _tiny_llama()
    trainer = _hf_trainer(tmp_path, model, _optimizer(model, "cosmos", False), 2, warmup=0, max_grad_norm=0.05,
                          callbacks=[RecordNorm()])
    trainer.train()
    reported = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert min(reported) > 0.05  # the norm before clipping ...
    assert max(norms_seen_by_the_step) == pytest.approx(0.05, rel=1e-4)  # ... and what the step got

    model = _tiny_llama()
    trainer = _hf_trainer(tmp_path, model, _optimizer(model, "lion", True), 2, warmup=0, max_grad_norm=1e-3)
    with pytest.raises(RuntimeError, match=r"max_grad_norm=0.*LayerwiseOptimizer\(\.\.\., max_grad_norm="):
        trainer.train()  # was: grad_norm 0.0 logged, nothing clipped


def _lora_llama() -> torch.nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(_tiny_llama(), config)


def test_peft_lora_with_layerwise_natural_galore_under_the_hf_trainer(tmp_path) -> None:
    model = _lora_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = _optimizer(model, "natural_galore", True, max_grad_norm=1.0)
    assert len(optimizer.param_groups) == len(lora)  # only the adapters, each stepped in backward
    trainer = _hf_trainer(tmp_path, model, optimizer, 6, warmup=1)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], before) for n, before in frozen.items())
    assert all(not torch.equal(named[n], before) for n, before in lora.items())

    resumed_model = _lora_llama()
    resumed = _hf_trainer(tmp_path / "resumed", resumed_model,
                          _optimizer(resumed_model, "natural_galore", True, max_grad_norm=1.0), 6, warmup=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert _same_weights(model, resumed_model)


# ---- accelerate ----------------------------------------------------------------------------------

def _accelerate_run(tmp_path, name: str, layerwise: bool, steps: int, *, save_at: int | None = None,
                    load: bool = False, clip: float | None = None):
    accelerator = accelerate.Accelerator(cpu=True)
    model = _tiny_llama()
    optimizer = _optimizer(model, name, layerwise)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    loader = torch.utils.data.DataLoader(_Counting(), batch_size=BATCH)
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    start = 0
    if load:
        accelerator.load_state(str(tmp_path / "state"))
        start = save_at
    losses, clipped = [], []
    for step in range(start, steps):
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            if clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), clip)
                clipped.append(float(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]))))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        if save_at is not None and not load and step + 1 == save_at:
            accelerator.save_state(str(tmp_path / "state"))
    return accelerator.unwrap_model(model), optimizer.optimizer, schedule, losses, clipped


@pytest.mark.parametrize("name,layerwise", [("frugal", True), ("galore_adamw", False)])
def test_accelerate_trains_follows_the_schedule_and_resumes_exactly(tmp_path, name: str, layerwise: bool) -> None:
    model, optimizer, schedule, losses, _ = _accelerate_run(tmp_path, name, layerwise, 6, save_at=3)
    assert losses[-1] < losses[0] - 0.05
    # prepare() reloads the optimizer's own state_dict: the warmup must still reach the updates.
    assert schedule.get_last_lr()[0] == pytest.approx(SMALL_LR[name])
    assert _inner_lrs(optimizer) == pytest.approx([SMALL_LR[name]] * len(_inner_lrs(optimizer)))
    resumed, *_ = _accelerate_run(tmp_path, name, layerwise, 6, save_at=3, load=True)
    assert _same_weights(model, resumed)


def test_accelerate_clip_grad_norm_clips_or_refuses_in_layerwise_mode(tmp_path) -> None:
    *_, clipped = _accelerate_run(tmp_path, "apollo", False, 2, clip=0.05)
    assert max(clipped) == pytest.approx(0.05, rel=1e-4)
    with pytest.raises(RuntimeError, match="global gradient norm"):
        _accelerate_run(tmp_path, "apollo", True, 1, clip=1.0)


# ---- PyTorch Lightning ---------------------------------------------------------------------------

class _LitLlama(lightning.LightningModule):
    def __init__(self, make_optimizer, manual: bool = False) -> None:
        super().__init__()
        self.model = _tiny_llama()
        self.make_optimizer = make_optimizer
        self.automatic_optimization = not manual
        self.losses: list[float] = []
        self.clipped_norms: list[float] = []
        self.lrs_read: list[list[float]] = []  # at each step, the lr every update reads

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.clipped_norms.append(float(torch.nn.utils.clip_grad_norm_(self.parameters(), float("inf"))))

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            self.lrs_read.append(_inner_lrs(self.trainer.optimizers[0]))
            loss = self.model(**batch).loss
        else:  # zeroth-order: the optimizer runs the forward passes through the closure
            loss = self.optimizers().step(closure=lambda: self.model(**batch).loss)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.model)
        if self.automatic_optimization:
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.85**step)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        return optimizer


def _lightning_fit(module, steps: int, ckpt_path=None, gradient_clip_val=None) -> lightning.Trainer:
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                deterministic=True, gradient_clip_val=gradient_clip_val)
    trainer.fit(module, torch.utils.data.DataLoader(_Counting(), batch_size=BATCH), ckpt_path=ckpt_path)
    return trainer


def test_lightning_layerwise_lion_trains_follows_the_schedule_and_resumes_exactly(tmp_path) -> None:
    def make(model):
        return _optimizer(model, "lion", True)

    module = _LitLlama(make)
    _lightning_fit(module, 3).save_checkpoint(str(tmp_path / "three.ckpt"))
    _lightning_fit(module, 6, ckpt_path=str(tmp_path / "three.ckpt"))
    assert module.losses[-1] < module.losses[0] - 0.05
    for step, lrs in enumerate(module.lrs_read):  # across the resume too
        assert lrs == pytest.approx([SMALL_LR["lion"] * 0.85**step] * len(lrs))
    assert len(module.lrs_read) == 6

    uninterrupted = _LitLlama(make)
    _lightning_fit(uninterrupted, 6)
    assert _same_weights(module.model, uninterrupted.model)


def test_lightning_gradient_clip_val_clips_or_refuses_in_layerwise_mode() -> None:
    module = _LitLlama(lambda model: _optimizer(model, "apollo", False))
    _lightning_fit(module, 2, gradient_clip_val=0.05)
    assert module.clipped_norms == pytest.approx([0.05, 0.05], rel=1e-4)
    assert module.losses[-1] < module.losses[0]
    with pytest.raises(RuntimeError, match="global norm, [0-9.]+, exceeds max_norm"):
        _lightning_fit(_LitLlama(lambda model: _optimizer(model, "lion", True)), 1, gradient_clip_val=1e-3)


def test_lightning_zeroth_order_manual_optimization_trains_and_automatic_is_refused() -> None:
    def make(model):
        return memzoo.create_optimizer(model, "mezo", lr=2e-3, eps=1e-3)

    module = _LitLlama(make, manual=True)
    _lightning_fit(module, 12)
    assert module.losses[-1] < module.losses[0]
    assert all(p.grad is None for p in module.parameters())
    with pytest.raises(RuntimeError, match=r"ran backward.*automatic_optimization = False"):
        _lightning_fit(_LitLlama(make), 1)  # was: a backward pass for every forward, silently

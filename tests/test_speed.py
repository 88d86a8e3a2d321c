"""Speed switches change speed, not results; the throughput metrics mean what they say.

Each switch (torch.compile, fused AdamW, bf16 autocast) trains the same nano Llama from the
same seed on the same batches as the plain path, and the loss curves must agree within float
noise. ``lm/tokens_per_s``/``lm/mfu`` count training time only and survive a resume.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lmgen.ar_module import ARModule, OptimConfig, SpeedConfig
from lmgen.data import SequenceLayout, TokenDataModule
from lmgen.llama import llama_config
from lmgen.perf import PEAK_FLOPS, device_peak, matmul_ceiling, precision_dtype

GRID = SequenceLayout(vocab_size=32, max_tokens=16, num_classes=3, variable_length=False)
STREAM = SequenceLayout(vocab_size=32, max_tokens=16, num_classes=3, variable_length=True)
STEPS = 12


def items(layout: SequenceLayout, n: int, seed: int = 0) -> list[tuple[torch.Tensor, int, int]]:
    """(ids, length, label) like TokenCache rows: a class pattern with noise; streams vary in length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 3
        ids = (label * 7 + 5 * torch.arange(16)) % 32
        noisy = torch.rand(16, generator=g) < 0.2
        ids = torch.where(noisy, torch.randint(0, 32, (16,), generator=g), ids)
        length = int(torch.randint(4, 17, (), generator=g)) if layout.variable_length else 16
        out.append((ids, length, label))
    return out


class LossHistory(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

        self.grad_norms: list[float] = []  # after clipping: the gradients the optimizer stepped with

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def train(layout: SequenceLayout, speed: SpeedConfig, precision: str = "32-true", steps: int = STEPS,  # noqa: PLR0913
          ckpt: str | None = None, root=None, validate: bool = True, clip: float | None = 1.0,
          history: LossHistory | None = None) -> tuple[ARModule, list[float], dict]:
    """Train as `lmgen run` does (gradients clipped at ``train.grad_clip``: 1.0)."""
    L.seed_everything(0, verbose=False)
    module = ARModule(llama_config("nano", layout.total_vocab, layout.seq_len), layout,
                      OptimConfig(lr=3e-3, warmup_steps=2, max_steps=STEPS), speed)
    data = TokenDataModule(items(layout, 96), items(layout, 24, seed=1), layout, batch_size=8, seed=0)
    history = history or LossHistory()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, precision=precision,
                        gradient_clip_val=clip,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, val_check_interval=4, check_val_every_n_epoch=None,
                        limit_val_batches=1.0 if validate else 0,
                        callbacks=[history], default_root_dir=root)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    if root is not None:
        trainer.save_checkpoint(f"{root}/last.ckpt")
    return module, history.losses, dict(trainer.callback_metrics)


PLAIN = SpeedConfig(compile=False, fused_adamw=False)


@pytest.mark.parametrize("layout", [GRID, STREAM], ids=["grid", "stream"])
def test_fused_adamw_gives_the_same_loss_curve(layout: SequenceLayout) -> None:
    _, plain, _ = train(layout, PLAIN)
    _, fused, _ = train(layout, SpeedConfig(fused_adamw=True))
    assert len(plain) == len(fused) == STEPS
    assert plain[-1] < plain[0]  # it learns, so the curves are not trivially flat
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-4, atol=1e-4)


def test_compile_gives_the_same_loss_curve_on_streams_of_changing_length() -> None:
    # Codec batches are trimmed to their longest stream, so widths change between batches:
    # the compiled graph must follow them (dynamic shapes) and still match eager.
    # (No validation: its no-grad graph would only add compile time.)
    _, plain, _ = train(STREAM, PLAIN, validate=False)
    module, compiled, _ = train(STREAM, SpeedConfig(compile=True, fused_adamw=False), validate=False)
    assert module._nll is not module._forward_nll  # the switch really compiled something
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(plain), rtol=1e-3, atol=1e-3)
    assert "embed.weight" in module.model.state_dict()  # checkpoints keep the plain keys


def test_bf16_autocast_follows_the_fp32_curve_within_noise() -> None:
    _, fp32, _ = train(GRID, PLAIN)
    _, bf16, _ = train(GRID, PLAIN, precision="bf16-mixed")
    # bf16 rounds activations (8 bits of mantissa): the curves agree to ~1%, not bitwise.
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=0.03, atol=0.03)


def test_fused_adamw_clips_gradients_under_bf16_autocast() -> None:
    # Lightning's mixed-precision plugin refuses to clip for a fused optimizer ("performs unscaling
    # internally"), bf16 included: on a GPU or an AMX CPU every run died at its first step.
    clipped, unclipped = LossHistory(), LossHistory()
    _, fused, _ = train(GRID, SpeedConfig(), precision="bf16-mixed", clip=0.05, history=clipped)
    _, plain, _ = train(GRID, PLAIN, precision="bf16-mixed", clip=0.05)
    train(GRID, SpeedConfig(), precision="bf16-mixed", clip=None, history=unclipped)
    assert max(clipped.grad_norms) <= 0.05 * 1.001
    assert min(unclipped.grad_norms) > 0.05  # so the clip above is what bounded them
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=0.01, atol=0.01)


def test_throughput_metrics_count_training_time_and_survive_a_resume(tmp_path) -> None:
    module, _, metrics = train(GRID, SpeedConfig(peak_flops=1e12))
    tokens = STEPS * 8 * GRID.max_tokens
    assert module.tokens_seen == tokens
    assert module.flops == pytest.approx(module.model.flops_per_token(GRID.seq_len - 1) * tokens)
    seconds = float(metrics["lm/train_seconds"])
    assert 0 < seconds
    assert float(metrics["lm/tokens_per_s"]) == pytest.approx(tokens / seconds, rel=1e-6)
    assert float(metrics["lm/mfu"]) == pytest.approx(module.flops / seconds / 1e12, rel=1e-6)

    half, _, _ = train(GRID, SpeedConfig(), steps=STEPS // 2, root=tmp_path)
    resumed, _, _ = train(GRID, SpeedConfig(), ckpt=str(tmp_path / "last.ckpt"))
    assert half.tokens_seen == tokens // 2 and resumed.tokens_seen == tokens  # counted on, not restarted
    assert resumed.flops == pytest.approx(module.flops)
    assert resumed.train_seconds > half.train_seconds


def test_device_peak_sources() -> None:
    cpu = torch.device("cpu")
    assert device_peak(cpu, torch.float32, configured=5e9).source == "config"
    measured = device_peak(cpu, torch.float32)
    assert measured.source == "measured" and measured.flops == matmul_ceiling(cpu, torch.float32) > 1e8
    assert precision_dtype("bf16-mixed") == torch.bfloat16 and precision_dtype("32-true") == torch.float32
    assert all(v > 1e13 for v in PEAK_FLOPS.values())


def test_gpu_peak_comes_from_the_table_by_name(monkeypatch) -> None:
    # No GPU here: only the name lookup is exercised (what a GPU would report).
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak = device_peak(torch.device("cuda"), torch.bfloat16)
    assert (peak.flops, peak.source) == (PEAK_FLOPS["H100"], "table:H100")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert device_peak(torch.device("cuda"), torch.bfloat16).source == "table:H100 PCIe"


def test_a_compiler_failure_falls_back_to_eager_training(monkeypatch, caplog) -> None:
    # A machine without a working C++ compiler: inductor cannot build its CPU kernels. The
    # switch is about speed, so the run trains on eagerly, with a warning, to the same curve.
    import torch._dynamo
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/c++"))
    monkeypatch.setattr(inductor, "force_disable_caches", True)  # no kernel compiled earlier may be reused
    torch._dynamo.reset()
    _, plain, _ = train(GRID, PLAIN, validate=False)
    module, fallback, _ = train(GRID, SpeedConfig(compile=True, fused_adamw=False), validate=False)
    torch._dynamo.reset()
    assert "torch.compile failed" in caplog.text and module._nll == module._forward_nll
    torch.testing.assert_close(torch.tensor(fallback), torch.tensor(plain), rtol=1e-5, atol=1e-5)

"""HF export: `to_hf` matches our Llama (logits, greedy KV-cache decoding), refuses sub-codes,
and `lmgen export-hf` turns a real run into a `LlamaForCausalLM` folder with its layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaForCausalLM  # noqa: E402

from lmgen.cli import main  # noqa: E402
from lmgen.hf_export import (
    MissingTransformers,  # noqa: E402
    to_hf,  # noqa: E402
)
from lmgen.llama import Llama, LlamaConfig  # noqa: E402
from lmgen.sampling import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V = 61


def tiny(n_kv_heads: int | None) -> Llama:
    """Non-default theta, eps and ffn width (each must reach the HF config), random norm gains
    (a swapped input/post-attention norm would otherwise go unnoticed), a sharp head (greedy
    decoding without near-ties)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, n_layers=2, n_heads=4, dim=32, n_kv_heads=n_kv_heads, ffn_dim=72,
                      max_seq_len=64, rope_theta=500.0, norm_eps=1e-6)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        model.head.weight.mul_(20)
    return model


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_logits_match_hf(n_kv_heads: int | None) -> None:
    model = tiny(n_kv_heads)
    hf = to_hf(model)
    c = hf.config
    assert isinstance(hf, LlamaForCausalLM) and not c.tie_word_embeddings
    assert (c.num_key_value_heads, c.intermediate_size, c.max_position_embeddings) == (model.cfg.n_kv_heads, 72, 64)
    assert c.rms_norm_eps == 1e-6
    theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]  # transformers 4 / 5
    assert theta == 500.0
    ids = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_greedy_kv_cache_decoding_matches_hf_generate(n_kv_heads: int | None) -> None:
    model = tiny(n_kv_heads)
    hf = to_hf(model, bos_token_id=V - 3, eos_token_id=V - 2, pad_token_id=V - 1)
    specials = [V - 3, V - 2, V - 1]  # never sampled: our `allowed` mask, HF's suppress_tokens
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[specials] = False
    prompt = torch.randint(0, V, (3, 3), generator=torch.Generator().manual_seed(2))  # a prefill, then T=1 steps
    ours = generate(model, prompt, 30, temperature=0, allowed=allowed, pad_id=V - 1).tokens
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=30,
                         min_new_tokens=30, suppress_tokens=specials)[:, 3:]
    assert theirs.shape == ours.shape == (3, 30)
    assert torch.equal(ours, theirs)
    assert len(set(ours.flatten().tolist())) > 3  # a real sequence, not one id repeated


def test_subcode_model_is_refused() -> None:
    cfg = LlamaConfig(vocab_size=37, n_layers=1, n_heads=2, dim=16, subcodes=(4, 8))
    with pytest.raises(ValueError, match="sub-code.*no LlamaForCausalLM equivalent"):
        to_hf(Llama(cfg))


def test_import_lmgen_llama_does_not_import_transformers() -> None:
    code = "import sys, lmgen.llama, lmgen.sampling; assert 'transformers' not in sys.modules, 'imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_missing_transformers_names_the_install(monkeypatch, lmgen_home, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(MissingTransformers, match="pip install"):
        to_hf(tiny(None))
    assert main(["export-hf", "0123456789abcdef", str(tmp_path / "out")]) == 2  # refused before any work
    assert "pip install transformers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


TINY = ["data.train_size=48", "data.val_size=16", "data.image_size=16", "lm.size=nano", "train.budget=steps", "train.max_steps=6",
        "train.val_every=4", "train.batch_size=8", "train.warmup_steps=2", "sample.num_samples=10",
        "sample.batch_size=10", "train.log_every=1"]
FAST = ["sample.num_samples=0", "metrics.prefix_samples=0", "metrics.probe=false"]  # export needs no evaluation


def test_export_hf_end_to_end(lmgen_home, tmp_path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    from lmgen.datasets import iter_batches
    from lmgen.experiment import restore_run

    assert main(["run", str(ROOT / "experiments/base.yaml"), "tokenizer=pixels_palette64", *TINY, *FAST]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{lmgen_home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("base").experiment_id])
    (lm,) = [r for r in runs if r.data.tags["lmgen.stage"] == "lm"]
    (tok,) = [r for r in runs if r.data.tags["lmgen.stage"] == "tokenizer"]
    run_id, out = lm.info.run_id, tmp_path / "hf"

    assert main(["export-hf", run_id, str(out)]) == 0
    assert "LlamaForCausalLM.from_pretrained" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "lmgen.json", "config.yaml", "tokenizer_state.pt"} <= {
        p.name for p in out.iterdir()}
    restored = restore_run(run_id)
    layout, card = restored.layout, json.loads((out / "lmgen.json").read_text())
    assert (card["vocab_size"], card["bos_id"], card["eos_id"], card["pad_id"]) == (
        layout.vocab_size, layout.bos, layout.eos, layout.pad)
    assert (card["class_offset"], card["null_class"], card["num_classes"], card["seq_len"]) == (
        layout.class_offset, layout.null_class, layout.num_classes, layout.seq_len)
    assert (card["variable_length"], card["class_conditional"]) == (False, True)
    assert card["run_id"] == run_id and card["config_hash"] == lm.data.tags["lmgen.config_hash"]
    assert card["tokenizer"]["name"] == "pixels" and card["tokenizer"]["palette_size"] == 64
    assert (out / "config.yaml").read_text() == Path(client.download_artifacts(run_id, "config.yaml")).read_text()

    hf = LlamaForCausalLM.from_pretrained(out).eval()
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (layout.bos, layout.eos, layout.pad)
    images = next(iter(iter_batches(restored.val_ds, 3)))  # a real sequence: [class, palette ids ...]
    tokens = restored.tokenizer.encode(images.images)
    seq = layout.sequences(tokens.ids, tokens.lengths, images.labels)  # (3, 257)
    with torch.no_grad():
        assert (hf(seq).logits - restored.model(seq)).abs().max() < 1e-4
        sampled = hf.generate(seq[:1, :1], attention_mask=torch.ones_like(seq[:1, :1]))  # the export's defaults
    assert sampled.shape == (1, layout.seq_len) and int(sampled[0, 1:].max()) < layout.vocab_size

    for bad, why in [("0123456789abcdef", "no run"), (tok.info.run_id, "not an lmgen LM run")]:
        assert main(["export-hf", bad, str(tmp_path / "never")]) == 2
        assert why in capsys.readouterr().err
    for name in ("last.ckpt", "last.prev.ckpt"):  # gone from this disk: the run's own weights artifact stands in
        (lmgen_home / "checkpoints" / run_id / name).unlink(missing_ok=True)
    assert main(["export-hf", run_id, str(tmp_path / "again")]) == 0
    assert (lmgen_home / "checkpoints" / run_id / "weights.pt").is_file()
    again = LlamaForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(seq).logits, hf(seq).logits)  # the same weights as the checkpoint held

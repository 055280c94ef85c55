"""The LM head quantized (``--quantize-all`` at load, ``moetier quantize``): its format per
rule (int8 / fp8 like the rest, int8 g128 under int4, ``--keep-head``), the native quantized
GEMV vs the torch dequantize-per-use path, tied heads as their own copy, the written
checkpoint read back, and census / plan counting the head's stored bytes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import moetier
import tests.helpers.moe_families  # noqa: F401
from moetier.errors import ConfigError
from moetier.layers.linear import QLinear
from moetier.planner.census import census
from moetier.quant.atload import census_groups
from moetier.quant.convert import quantize_weight
from moetier.spec import load_spec
from tests.helpers import make_tiny_checkpoint
from tests.helpers.parity import assert_parity
from tests.helpers.quantized import write_dequantized
from tests.quant.test_tools import _cli

H, V = 256, 300  # two int8 groups of 128 per head row; 300 rows: a partial 128-row FP8 block


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("head"), "qwen3_moe", tokenizer=False, hidden_size=H,
                                vocab_size=V, num_hidden_layers=2)


@pytest.fixture(scope="module")
def ck_tied(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tied"), "qwen3_moe", tokenizer=False, hidden_size=H,
                                vocab_size=V, num_hidden_layers=2, tie_word_embeddings=True)


def decode_logits(m, ids: list[int]) -> torch.Tensor:
    """Logits of one-token steps (the native decode step when the model has one) [len, V]."""
    seq = m.new_sequence(capacity=len(ids))
    return torch.cat([m.step([(seq, [t])]) for t in ids])


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item(), f"max |diff| {err:.3g} vs max |logit| {b.abs().max().item():.3g}"


HEADS = {"int8": ("int8_group", (1, 128)), "fp8": ("fp8_e4m3_block", (128, 128)), "int4": ("int8_group", (1, 128))}


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_quantized_head_native_matches_torch(ck, fmt):
    kw = dict(tokenizer=False, dtype="float32", quantize=fmt, quantize_all=True, quantize_group=32 if fmt == "int4"
              else None)
    m = moetier.load(ck, **kw)
    t = moetier.load(ck, native=False, **kw)
    assert m.native_reason is None and t.net.native is None
    head = m.net.lm_head
    assert isinstance(head, QLinear) and (head.qweight.fmt, head.qweight.block) == HEADS[fmt]
    plain = moetier.load(ck, tokenizer=False, dtype="float32")
    # the head is the checkpoint's head quantized (round to nearest, as the experts)
    want = quantize_weight(plain.net.lm_head.weight, "int8" if fmt == "int4" else fmt, 128)
    assert torch.equal(head.qweight.data, want.data) and torch.equal(head.qweight.scale, want.scale)
    ids = [(7 * i + 3) % V for i in range(12)]
    # the native quantized GEMV (decode step and prefill) vs the torch path's per-use dequantization
    ref = decode_logits(t, ids)
    assert_close(decode_logits(m, ids), ref)
    assert_close(m.logits(ids), ref)
    # the quantized head moved the logits (it is in use), by less than the format's rounding
    d = (ref - decode_logits(moetier.load(ck, native=False, quantize_keep_head=True, **kw), ids)).abs().max()
    assert 0 < d < 0.05 * ref.abs().max()
    # bytes per token: the head's stored bytes, not V x H x 4
    keep = moetier.load(ck, quantize_keep_head=True, **kw)
    assert keep.net.dense_bytes_per_token() - m.net.dense_bytes_per_token() == V * H * 4 - head.qweight.nbytes


def test_tiered_quantized_head_equals_in_ram(ck):
    """A cache over the files with everything quantized at load: the same logits as in RAM, and
    the budget's precision names the head's format."""
    kw = dict(tokenizer=False, dtype="float32", quantize="int4", quantize_all=True, quantize_group=32)
    m = moetier.load(ck, **kw)
    t = moetier.load(ck, expert_cache=0.25, **kw)
    try:
        ids = [(3 * i + 2) % V for i in range(10)]
        assert torch.equal(decode_logits(t, ids), decode_logits(m, ids))
        assert "lm_head=int8:g128" in t.placement_precision
    finally:
        t.hierarchy.close()


def test_keep_head_and_option_errors(ck):
    m = moetier.load(ck, tokenizer=False, dtype="float32", quantize="int8", quantize_all=True,
                     quantize_keep_head=True)
    assert type(m.net.lm_head) is torch.nn.Linear and m.native_reason is None
    assert sum(isinstance(x, QLinear) for x in m.net.modules()) == 2 * 4  # q, k, v, o per layer: not the head
    e = moetier.load(ck, tokenizer=False, dtype="float32", quantize="int8")  # experts only: head as stored
    assert type(e.net.lm_head) is torch.nn.Linear
    with pytest.raises(ConfigError, match="quantize_keep_head=True needs quantize_all=True"):
        moetier.load(ck, tokenizer=False, quantize="int8", quantize_keep_head=True)
    r = _cli("run", str(ck), "--prompt", "hi", "--quantize", "int8", "--keep-head")
    assert r.returncode == 2 and "--keep-head needs --quantize-all" in r.stderr
    r = _cli("run", str(ck), "--prompt", "hi", "--keep-head")
    assert r.returncode == 2 and "--keep-head needs --quantize" in r.stderr


def test_tied_head_gets_its_own_copy(ck_tied):
    spec = load_spec(ck_tied)
    assert spec.tie_word_embeddings
    plain = moetier.load(ck_tied, tokenizer=False, dtype="float32")
    assert plain.net.lm_head is None
    kw = dict(tokenizer=False, dtype="float32", quantize="int8", quantize_all=True)
    m = moetier.load(ck_tied, **kw)
    t = moetier.load(ck_tied, native=False, **kw)
    head = m.net.lm_head
    assert isinstance(head, QLinear) and head.qweight.fmt == "int8_group" and m.native_reason is None
    assert torch.equal(m.net.embed_tokens.weight, plain.net.embed_tokens.weight)  # the embedding stays
    want = quantize_weight(plain.net.embed_tokens.weight, "int8", 128)
    assert torch.equal(head.qweight.data, want.data) and torch.equal(head.qweight.scale, want.scale)
    ids = [(5 * i + 1) % V for i in range(10)]
    ref = decode_logits(t, ids)
    assert_close(decode_logits(m, ids), ref)
    assert 0 < (ref - decode_logits(plain, ids)).abs().max() < 0.05 * ref.abs().max()
    assert moetier.load(ck_tied, quantize_keep_head=True, **kw).net.lm_head is None
    # census: the copy is what a token reads (embedding: one row); not a parameter of the model
    base = census(spec, "mixed:" + census_groups("int8", 128, True, keep_head=True) + ",default=fp32")
    cp = census(spec, "mixed:" + census_groups("int8", 128, True) + ",default=fp32")
    assert cp.head_copy and not base.head_copy and cp.total_params == base.total_params
    head_bytes = V * H * (1 + 2 / 128)
    assert cp.groups["lm_head"].bytes == pytest.approx(head_bytes)
    assert cp.active_bytes == pytest.approx(base.active_bytes - V * H * 4 + H * 4 + head_bytes)


def test_census_groups_names_the_head():
    assert census_groups("int4", 32, True) == "ffn=int4:g32,attention=int4:g32,lm_head=int8:g128"
    assert census_groups("fp8", 128, True) == "ffn=fp8,attention=fp8,lm_head=fp8"
    assert census_groups("int8", 64, True, keep_head=True) == "ffn=int8:g64,attention=int8:g64"
    assert census_groups("int4", 32, False) == "routed=int4:g32"
    # a head whose rows are not whole 128-value groups: g64 / g32 (compressed-tensors reads whole groups)
    assert census_groups("int4", 32, True, hidden=192).endswith("lm_head=int8:g64")
    assert census_groups("int4", 32, True, hidden=96).endswith("lm_head=int8:g32")


def _stored(d, name):
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return f.get_tensor(name) if name in f.keys() else None


def test_quantize_cli_writes_the_head(ck, ck_tied, tmp_path):
    out = tmp_path / "int4"
    r = _cli("quantize", str(ck), str(out), "--format", "int4", "--group", "32")
    assert r.returncode == 0, r.stderr
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in q["ignore"]
    assert q["config_groups"]["group_1"]["targets"] == ["lm_head"]
    assert q["config_groups"]["group_1"]["weights"]["num_bits"] == 8
    assert q["config_groups"]["group_1"]["weights"]["group_size"] == 128
    assert _stored(out, "lm_head.weight") is None
    assert tuple(_stored(out, "lm_head.weight_packed").shape) == (V, H // 4)
    assert tuple(_stored(out, "lm_head.weight_scale").shape) == (V, H // 128)
    m = moetier.load(out, tokenizer=False, dtype="float32")
    assert (m.net.lm_head.qweight.fmt, m.net.lm_head.qweight.block) == ("int8_group", (1, 128))
    assert m.provider.get(0, 0).split[0].block == (1, 32) and m.native_reason is None
    # == transformers on the dequantized weights (head included)
    assert_parity(out, prompt_len=12, steps=3, ref_path=write_dequantized(out, tmp_path / "deq"), ours=m)
    # census / plan: the head at its stored bytes and format
    r = _cli("census", str(out), "--precision", "checkpoint", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert "lm_head=int8:g128" in d["precision"]
    assert d["stored_bytes"]["lm_head"] == V * H + V * (H // 128) * 2 + 16  # values, bf16 scales, weight_shape
    assert d["groups"]["lm_head"]["bytes"] == pytest.approx(V * H * (1 + 2 / 128))
    kept = tmp_path / "int4-keep"
    assert _cli("quantize", str(ck), str(kept), "--format", "int4", "--keep-head").returncode == 0
    assert _stored(kept, "lm_head.weight").dtype == torch.float32 and "lm_head" in json.loads(
        (kept / "config.json").read_text())["quantization_config"]["ignore"]
    k = json.loads(_cli("census", str(kept), "--precision", "checkpoint", "--json").stdout)
    assert k["stored_bytes"]["lm_head"] == V * H * 4
    plans = [json.loads(_cli("plan", str(x), "--machine", "h100", "--json").stdout) for x in (out, kept)]
    assert "lm_head=int8:g128" in plans[0]["precision"]
    assert plans[0]["decode"]["tokens_per_s"] > plans[1]["decode"]["tokens_per_s"]
    # fp8: the head stays as stored (readers of the FP8 layout keep it plain)
    f8 = tmp_path / "fp8"
    assert _cli("quantize", str(ck), str(f8), "--format", "fp8").returncode == 0
    assert _stored(f8, "lm_head.weight").dtype == torch.float32 and _stored(f8, "lm_head.weight_scale_inv") is None
    assert type(moetier.load(f8, tokenizer=False).net.lm_head) is torch.nn.Linear
    # int8 with a tied head: written as its own lm_head, config untied, the embedding as it was
    t8 = tmp_path / "tied-int8"
    assert _cli("quantize", str(ck_tied), str(t8), "--format", "int8").returncode == 0
    assert json.loads((t8 / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(_stored(t8, "model.embed_tokens.weight"), _stored(ck_tied, "model.embed_tokens.weight"))
    mt = moetier.load(t8, tokenizer=False, dtype="float32")
    assert mt.net.lm_head.qweight.fmt == "int8_group" and mt.net.lm_head.qweight.block == (1, 128)
    assert_parity(t8, prompt_len=12, steps=3, ref_path=write_dequantized(t8, tmp_path / "deq8"), ours=mt)
    r = _cli("quantize", str(ck), str(tmp_path / "x"), "--format", "int8", "--experts-only", "--keep-head")
    assert r.returncode == 2 and "--keep-head" in r.stderr and "Traceback" not in r.stderr


def test_compressed_tensors_reads_the_int8_head(ck, tmp_path):
    """transformers + compressed-tensors load the written int4 checkpoint (int8 g128 head by name)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "int4"
    assert _cli("quantize", str(ck), str(out), "--format", "int4").returncode == 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = list(range(3, 20))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    deq = moetier.load(write_dequantized(out, tmp_path / "deq"), tokenizer=False, dtype="float32")
    ours = deq.logits(ids)
    # the package dequantizes in the scale dtype (bf16): close, not bit-equal; a head read as
    # int4 or left unscaled would be far off
    assert (ours - theirs).abs().max() < 0.02 * ours.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert math.isfinite(theirs.abs().max().item())

"""Quantized checkpoints in the tools: census / plan stored bytes, `moetier quantize`, quantize at load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401
from moetier.errors import ConfigError
from moetier.quant import QTensor
from tests.helpers import make_tiny_checkpoint
from tests.helpers.parity import assert_parity
from tests.helpers.quantized import make_quantized_checkpoint, write_dequantized

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetier.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=600)


@pytest.mark.parametrize("mtp", [False, True])
def test_census_checkpoint_precision_reports_stored_bytes(tmp_path, mtp):
    ck = make_quantized_checkpoint(tmp_path, "deepseek_v3", "fp8", block=(16, 16), tokenizer=False, mtp=mtp)
    r = _cli("census", str(ck), "--precision", "checkpoint", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    files = sum(p.stat().st_size for p in ck.glob("*.safetensors"))
    # every stored byte is in exactly one group (the header and the weight_shape-free layout aside)
    assert 0 < files - sum(d["stored_bytes"].values()) < 20_000  # the safetensors JSON header
    assert "routed_experts=fp8" in d["precision"] and "attention=fp8" in d["precision"]
    assert "embedding=fp32" in d["precision"]  # the tiny checkpoint keeps fp32 embeddings
    assert (d["stored_bytes"]["mtp"] > 0) == mtp
    assert (d["mtp_params"] > 0) == mtp  # config.json names an MTP layer only in the mtp case
    # the formula at the stored formats is close to the real bytes (partial 16x16 blocks aside)
    for g in ("routed_experts", "attention", "shared_experts"):
        assert abs(d["groups"][g]["bytes"] - d["stored_bytes"][g]) <= 0.05 * d["stored_bytes"][g]
    r = _cli("census", str(ck), "--precision", "checkpoint")
    assert r.returncode == 0 and "stored (files)" in r.stdout
    r = _cli("census", str(ck))  # a quantized directory defaults to its stored format
    assert r.returncode == 0 and "stored (files)" in r.stdout and "attention=fp8" in r.stdout
    for extra in (["--precision", "checkpoint"], []):
        r = _cli("plan", str(ck), "--machine", "h100", "--json", *extra)
        assert r.returncode == 0, r.stderr
        assert "attention=fp8" in json.loads(r.stdout)["precision"]


def test_quantize_command_round_trip(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "qwen3_moe", name="src", dtype=torch.bfloat16)
    out = tmp_path / "int4"
    r = _cli("quantize", str(src), str(out), "--format", "int4", "--group", "32")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (out / "tokenizer.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["format"] == "pack-quantized" and q["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert "lm_head" not in q["ignore"] and "model.layers.0.mlp.gate" in q["ignore"]  # head: int8 g128
    assert q["config_groups"]["group_1"]["targets"] == ["lm_head"]
    m = moetier.load(out, dtype="float32", tokenizer=False)
    assert m.provider.get(0, 0).split[0].fmt == "int4_group"
    # moetier's own loader == transformers on the dequantized weights
    assert_parity(out, prompt_len=16, steps=4, ref_path=write_dequantized(out, tmp_path / "deq"), ours=m)
    # transformers reads the file itself (through the compressed-tensors package)
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = list(range(3, 20))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    ours = m.logits(ids)
    # the package dequantizes in the scale dtype (bf16 here): close, not bit-equal
    assert (ours - theirs).abs().max() < 0.05 * ours.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # errors: already quantized, bad format, non-empty output
    assert _cli("quantize", str(out), str(tmp_path / "x"), "--format", "int8").returncode == 2
    r = _cli("quantize", str(src), str(out), "--format", "fp8")
    assert r.returncode == 2 and "not empty" in r.stderr


def test_quantize_fp8_command(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "mixtral", name="src", tokenizer=False)
    out = tmp_path / "fp8"
    assert _cli("quantize", str(src), str(out), "--format", "fp8").returncode == 0
    m = moetier.load(out, dtype="float32", tokenizer=False)
    assert m.provider.get(0, 1).down.fmt == "fp8_e4m3_block"
    assert_parity(out, prompt_len=16, steps=4, ref_path=write_dequantized(out, tmp_path / "deq"), ours=m)


def test_quantize_at_load(tmp_path):
    ck = make_tiny_checkpoint(tmp_path, "qwen3_moe", tokenizer=False, num_hidden_layers=2)
    plain = moetier.load(ck, tokenizer=False, dtype="float32")
    q4 = moetier.load(ck, tokenizer=False, dtype="float32", quantize="int4", quantize_group=32)
    w = q4.provider.get(1, 2)
    assert isinstance(w.down, QTensor) and w.down.fmt == "int4_group" and w.down.block == (1, 32)
    assert not any(type(m).__name__ == "QLinear" for m in q4.net.modules())  # experts only by default
    assert q4.native_reason is None  # the native kernels read int4_group weights as stored
    qa = moetier.load(ck, tokenizer=False, dtype="float32", quantize="int8", quantize_all=True)
    assert sum(type(m).__name__ == "QLinear" for m in qa.net.modules()) == 2 * 4 + 1  # q, k, v, o per layer; head
    assert qa.net.lm_head.qweight.fmt == "int8_group"
    ids = list(range(4, 40))
    lp, l4, l8 = plain.logits(ids), q4.logits(ids), qa.logits(ids)
    assert 0 < (l8 - lp).abs().max() < (l4 - lp).abs().max()  # int8 closer than int4 g32
    # tiered (cache over the files, experts quantized as they are read) == in RAM, bit for bit
    t4 = moetier.load(ck, tokenizer=False, dtype="float32", quantize="int4", quantize_group=32, expert_cache=0.25)
    try:
        assert torch.equal(t4.logits(ids), l4)
        assert t4.hierarchy.layout.expert_bytes == w.nbytes < plain.provider.get(1, 2).nbytes / 5
    finally:
        t4.hierarchy.close()
    with pytest.raises(ConfigError, match="quantize='int3'"):
        moetier.load(ck, tokenizer=False, quantize="int3")
    r = _cli("run", str(ck), "--prompt", "hi", "--quantize-all")
    assert r.returncode == 2 and "--quantize-all needs --quantize" in r.stderr


def test_gpt_oss_mxfp4_matches_transformers_own_loader(tmp_path):
    """transformers loads the MXFP4 release itself (Mxfp4Config(dequantize=True)): same logits."""
    tr = pytest.importorskip("transformers")
    ck = make_quantized_checkpoint(tmp_path, "gpt_oss", "mxfp4", tokenizer=False)
    try:
        hf = tr.AutoModelForCausalLM.from_pretrained(
            ck, dtype=torch.float32, quantization_config=tr.Mxfp4Config(dequantize=True)).eval()
    except Exception as e:  # pragma: no cover - depends on the transformers build
        pytest.skip(f"transformers cannot load MXFP4 on this machine: {e}")
    ids = list(range(5, 30))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    ours = moetier.load(ck, dtype="float32", tokenizer=False).logits(ids)
    print("mxfp4 vs transformers", (ours - theirs).abs().max().item())
    assert (ours - theirs).abs().max() <= 1e-4

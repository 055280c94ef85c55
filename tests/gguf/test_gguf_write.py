"""``moetier quantize SRC OUT.gguf --type T`` (weights/gguf_write.py): the file llama.cpp's
converter writes (BF16), read back by gguf-py and moetier, and run by moetier like the same
weights dequantized."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moetier
from moetier.quant.ggml import BY_TYPE
from moetier.quant.ggml_quantize import TYPE_IDS
from moetier.weights.gguf_io import GGUFIndex, gguf_tensor_name, hf_names
from moetier.weights.gguf_write import write_gguf
from scripts.make_gguf_fixtures import _WIDE, hf_checkpoint
from tests.gguf.helpers import fixture
from tests.helpers.checkpoints import make_tiny_checkpoint

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install moetier[gguf]) is not installed")

# keys the converter writes differently on purpose: its display name and size label; the
# pre-tokenizer (the bench's converter writes 'qwen2' for an unknown hash, moetier names the
# split the tokenizer.json uses); OLMoE's epsilon (the converter writes 1e-5 whatever the
# config says; moetier writes the config's value, the one transformers uses)
DIFFERENT_KEYS = {"general.name", "general.size_label", "tokenizer.ggml.pre", "olmoe.attention.layer_norm_rms_epsilon"}


def fields(r) -> dict:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("name", ["qwen3moe-bf16", "qwen2moe-bf16", "olmoe-bf16", "mixtral-bf16"])
def test_bf16_equals_llama_cpp_converter(name: str, tmp_path: Path) -> None:
    """The committed fixtures were written by llama.cpp's convert_hf_to_gguf.py from these
    checkpoints: same tensors (names, types, shapes, bytes: merged experts, Mixtral's permuted
    q/k rows, F32 norms and routers) and the same metadata and vocabulary."""
    if name.startswith("mixtral"):
        pytest.importorskip("sentencepiece")
    ck = hf_checkpoint(name, tmp_path)
    out = tmp_path / "out.gguf"
    rep = write_gguf(ck, out, "BF16")
    want, got = gguf.GGUFReader(fixture(name)), gguf.GGUFReader(out)
    tw, tg = {t.name: t for t in want.tensors}, {t.name: t for t in got.tensors}
    assert set(tw) == set(tg)
    for n, t in tw.items():
        g = tg[n]
        assert (g.tensor_type, list(g.shape)) == (t.tensor_type, list(t.shape)), n
        assert np.array_equal(np.asarray(g.data).view(np.uint8), np.asarray(t.data).view(np.uint8)), n
    fw, fg = fields(want), fields(got)
    assert {k: v for k, v in fw.items() if k not in DIFFERENT_KEYS} == {k: v for k, v in fg.items()
                                                                        if k not in DIFFERENT_KEYS}
    assert rep.types["BF16"] > 0 and rep.types["F32"] > 0


def test_names_round_trip_through_the_reader_table() -> None:
    for hf in ["model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.gate.weight", "model.norm.weight",
               "model.layers.1.mlp.shared_expert.down_proj.weight", "model.layers.2.post_attention_layernorm.weight",
               "lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.bias"]:
        g, e = gguf_tensor_name(hf)
        assert e is None and hf in hf_names(g)
    assert gguf_tensor_name("model.layers.4.mlp.experts.7.down_proj.weight") == ("blk.4.ffn_down_exps.weight", 7)
    assert gguf_tensor_name("model.layers.4.block_sparse_moe.experts.2.w3.weight") == ("blk.4.ffn_up_exps.weight", 2)
    assert gguf_tensor_name("model.layers.4.block_sparse_moe.gate.weight") == ("blk.4.ffn_gate_inp.weight", None)
    assert gguf_tensor_name("model.rotary_emb.inv_freq") is None


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A qwen3_moe checkpoint wide enough (256) for the K types, 4 layers for the mixes' layer rules."""
    over = dict(_WIDE, num_hidden_layers=4, num_experts=4, moe_intermediate_size=128)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide"), "qwen3_moe", seed=21, **over)


@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q8_0", "Q6_K", "Q5_K_M"])
def test_round_trip_and_logits(recipe: str, wide: Path, tmp_path: Path) -> None:
    out = tmp_path / f"m-{recipe}.gguf"
    rep = write_gguf(wide, out, recipe)
    r = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_gate_inp.weight"] == "F32"
    if recipe == "Q4_K_M":  # use_more_bits(i, 4): layers 2 and 3; moe_intermediate 128 -> fallback
        assert types["output.weight"] == "Q6_K"
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
        assert [types[f"blk.{i}.ffn_down_exps.weight"] for i in range(4)] == ["Q5_0", "Q5_0", "Q8_0", "Q8_0"]
        assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K"
        assert len(rep.notes) == 4 and all("llama-quantize's fallback" in n for n in rep.notes)
    # moetier's reader: its blocks are the file's, dequantized bit for bit as gguf-py does
    idx = GGUFIndex(out)
    src = {t.name: t for t in r.tensors}
    for gname, t in src.items():
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            continue
        ours = hf_names(gname)[0]
        fmt = BY_TYPE[TYPE_IDS[t.tensor_type.name]]
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        if gname.endswith("_exps.weight"):
            for e in (0, t.shape[-1] - 1):
                q = idx.read_rows_q(ours, int(e))
                assert q.fmt == fmt.name
                assert np.array_equal(q.dequantize().numpy().view(np.int32), ref[e].view(np.int32)), gname
        else:
            q = idx.read_q(ours)
            if isinstance(q, torch.Tensor):  # the token embedding: dequantized once at load
                assert np.array_equal(q.numpy().view(np.int32), ref.reshape(q.shape).view(np.int32)), gname
                continue
            assert np.array_equal(q.data.numpy(), np.asarray(t.data).reshape(q.data.shape)), gname
            assert np.array_equal(q.dequantize().numpy().view(np.int32), ref.reshape(q.shape).view(np.int32))
    idx.close()
    # end to end: the quantized file runs like the same weights dequantized to float32
    deq = tmp_path / "deq.gguf"
    write_gguf(out, deq, "F32")  # every block tensor dequantized (gguf-py), the rest copied
    assert {t.tensor_type.name for t in gguf.GGUFReader(deq).tensors} == {"F32"}
    prompt = torch.randint(3, 200, (13,), generator=torch.Generator().manual_seed(1))
    a = moetier.load(out, dtype="float32", tokenizer=False).logits(prompt)
    b = moetier.load(deq, dtype="float32", tokenizer=False).logits(prompt)
    assert (a - b).abs().max().item() <= 1e-4


def test_more_bits_less_error(wide: Path, tmp_path: Path) -> None:
    """Logit error vs the float checkpoint shrinks with the bits: Q4_K_M > Q5_K_M > Q6_K > Q8_0."""
    prompt = torch.randint(3, 200, (13,), generator=torch.Generator().manual_seed(2))
    f = moetier.load(wide, dtype="float32", tokenizer=False).logits(prompt)
    err = {}
    for recipe in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"):
        write_gguf(wide, tmp_path / f"{recipe}.gguf", recipe)
        a = moetier.load(tmp_path / f"{recipe}.gguf", dtype="float32", tokenizer=False).logits(prompt)
        err[recipe] = ((a - f).norm() / f.norm()).item()
    assert err["Q4_K_M"] > err["Q5_K_M"] > err["Q6_K"] > err["Q8_0"], err
    assert err["Q8_0"] < 0.05, err  # random tiny weights: routing flips amplify the 0.5 % weight error


def test_gguf_source_requantizes_to_the_same_file(wide: Path, tmp_path: Path) -> None:
    """A float GGUF (here moetier's F32 one) as the source gives the same tensors as the checkpoint."""
    f32 = tmp_path / "f32.gguf"
    write_gguf(wide, f32, "F32")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf(wide, a, "Q4_K_M")
    write_gguf(f32, b, "Q4_K_M")
    ta, tb = gguf.GGUFReader(a).tensors, gguf.GGUFReader(b).tensors
    assert [t.name for t in ta] == [t.name for t in tb]
    for x, y in zip(ta, tb):
        assert x.tensor_type == y.tensor_type and np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetier", "quantize", *args], capture_output=True, text=True)


def test_bad_input_is_one_line(wide: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"")
    cases = [
        ([str(wide), str(out), "--type", "Q4_K_M"], "output file exists"),
        ([str(wide), str(tmp_path / "y.gguf"), "--type", "IQ2_XS"], "invalid choice"),
        ([str(wide), str(tmp_path / "y.gguf"), "--format", "int4"], "needs --type"),
        ([str(wide), str(tmp_path / "y.bin"), "--type", "Q8_0"], "must end in .gguf"),
        ([str(wide), str(tmp_path / "y.gguf"), "--type", "Q8_0", "--group", "32"], "takes no --format"),
        ([str(fixture("qwen3moe-q8_0")), str(tmp_path / "y.gguf"), "--type", "Q4_K"], "not already-quantized"),
        ([str(tmp_path / "nope"), str(tmp_path / "y.gguf"), "--type", "Q4_K"], "no such checkpoint"),
        ([str(wide), str(tmp_path / "y.gguf")], "give --format"),
    ]
    for args, msg in cases:
        p = cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (args, p.stderr)
    assert not (tmp_path / "y.gguf").exists()
    p = cli(str(wide), str(tmp_path / "ok.gguf"), "--type", "Q4_K")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {tmp_path / 'ok.gguf'} (Q4_K)")
    notes = p.stderr.strip().splitlines()  # moe_intermediate 128: the four ffn_down_exps fall back
    assert len(notes) == 4 and all(n.startswith("note: blk.") and "Q5_0 instead" in n for n in notes)

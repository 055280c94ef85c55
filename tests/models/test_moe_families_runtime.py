"""deepseek_v2 / deepseek_v3 / gpt_oss / llama4 beyond single-sequence parity: several
sequences in one flat batch (custom attention modules are per sequence), the per-expert
reader of fused layouts, and up-front validation of quantised release formats."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetier
from moetier.errors import WeightError
from tests.helpers import make_tiny_checkpoint
from tests.helpers.moe_families import NAMES  # importing it registers the recipes


@pytest.mark.parametrize("family", NAMES)
def test_flat_batch_matches_single_sequences(tmp_path, family):
    m = moetier.load(make_tiny_checkpoint(tmp_path, family, tokenizer=False), dtype="float32", tokenizer=False)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 300, (20,), generator=g), torch.randint(0, 300, (13,), generator=g)
    alone = torch.cat([m.logits(a), m.logits(b)])
    s1, s2 = m.new_sequence(), m.new_sequence()
    both = m.step([(s1, a), (s2, b)], all_logits=True)  # one flat batch of 33 tokens
    assert (both - alone).abs().max().item() <= 1e-5
    # one decode step of both sequences together vs each alone
    nxt = m.step([(s1, [7]), (s2, [9])])
    r1, r2 = m.new_sequence(), m.new_sequence()
    m.step([(r1, a)]), m.step([(r2, b)])
    want = torch.cat([m.step([(r1, [7])]), m.step([(r2, [9])])])
    assert (nxt - want).abs().max().item() <= 1e-5


def test_fused_reader_splits_interleaved_gate_up(tmp_path):
    """gpt-oss expert e: gate = gate_up_proj[e][:, 0::2].T, up = [:, 1::2].T, biases alike."""
    path = make_tiny_checkpoint(tmp_path, "gpt_oss", tokenizer=False)
    m = moetier.load(path, dtype="float32", tokenizer=False)
    sd = load_file(path / "model.safetensors")
    gu, gub = sd["model.layers.1.mlp.experts.gate_up_proj"][5], sd["model.layers.1.mlp.experts.gate_up_proj_bias"][5]
    ew = m.expert_reader.read(1, 5)
    assert torch.equal(ew.gate, gu[:, 0::2].T) and torch.equal(ew.up, gu[:, 1::2].T)
    assert torch.equal(ew.gate_bias, gub[0::2]) and torch.equal(ew.up_bias, gub[1::2])
    assert torch.equal(ew.down, sd["model.layers.1.mlp.experts.down_proj"][5].T)
    assert torch.equal(ew.down_bias, sd["model.layers.1.mlp.experts.down_proj_bias"][5])
    assert m.expert_reader.expert_nbytes() == ew.nbytes


def _rewrite(path, fn):
    f = path / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_gpt_oss_missing_and_misshaped_experts(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "gpt_oss", tokenizer=False)
    name = "model.layers.1.mlp.experts.down_proj_bias"
    _rewrite(path, lambda sd: sd.update({name: sd[name][:, :-1].contiguous()}))
    with pytest.raises(WeightError, match=rf"'{name}' has shape \[8, 63\]"):
        moetier.load(path, tokenizer=False)
    _rewrite(path, lambda sd: sd.pop(name))
    with pytest.raises(WeightError, match=rf"'{name}' is missing"):
        moetier.load(path, tokenizer=False)


def test_quantised_release_formats_are_validated_up_front(tmp_path):
    """MXFP4 / FP8 release tensors load (tests/quant); companions that do not fit are one clear
    WeightError naming the file and tensor, before any weight is read."""
    oss = make_tiny_checkpoint(tmp_path, "gpt_oss", tokenizer=False)
    p = "model.layers.0.mlp.experts.gate_up_proj"

    def to_mxfp4(sd, groups):
        sd.pop(p)
        sd[p + "_blocks"] = torch.zeros(8, 64, 2, 16, dtype=torch.uint8)
        sd[p + "_scales"] = torch.full((8, 64, groups), 127, dtype=torch.uint8)

    _rewrite(oss, lambda sd: to_mxfp4(sd, 3))
    with pytest.raises(WeightError, match=rf"model\.safetensors: tensor '{p}_blocks': MXFP4 scales are "
                                          r"torch\.uint8 \[64, 3\], expected uint8 \[64, 2\]"):
        moetier.load(oss, tokenizer=False)
    _rewrite(oss, lambda sd: sd.update({p + "_scales": sd[p + "_scales"][..., :2].contiguous()}))
    m = moetier.load(oss, tokenizer=False)  # now a valid MXFP4 layer: loads, stays MXFP4
    assert m.provider.get(0, 0).split[0].fmt == "mxfp4"
    ds = make_tiny_checkpoint(tmp_path, "deepseek_v3", tokenizer=False)
    w = "model.layers.1.mlp.experts.0.up_proj.weight"
    _rewrite(ds, lambda sd: sd.update({w + "_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(WeightError, match=rf"tensor '{w}': FP8 block-scaled weight has dtype torch.float32"):
        moetier.load(ds, tokenizer=False)
    _rewrite(ds, lambda sd: sd.update({w: sd[w].to(torch.float8_e4m3fn), w + "_scale_inv": torch.ones(2, 1)}))
    with pytest.raises(WeightError, match=rf"tensor '{w}': FP8 block scale \(weight_scale_inv\) has shape \[2, 1\], "
                                          r"but a \[32, 64\] weight in 128x128 blocks needs \[1, 1\]"):
        moetier.load(ds, tokenizer=False)
    _rewrite(ds, lambda sd: sd.pop(w + "_scale_inv"))
    with pytest.raises(WeightError, match=rf"tensor '{w}' has dtype F8_E4M3, expected a float type \(FP8 weights "
                                          r"need their weight_scale_inv\)"):
        moetier.load(ds, tokenizer=False)

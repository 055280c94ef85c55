"""Bad checkpoints raise one clear WeightError / MoetierError naming the file or tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetier
from moetier.errors import ConfigError, MoetierError, UnsupportedModelError, WeightError
from moetier.weights.safetensors_io import SafetensorsIndex
from tests.helpers import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck"), "qwen3_moe", num_hidden_layers=2)


@pytest.fixture
def ckpt(ckpt_dir, tmp_path):
    """A fresh copy per test (tests corrupt it)."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(ckpt_dir, dst)
    return dst


def test_loads_clean(ckpt):
    m = moetier.load(ckpt)
    assert m.logits([1, 2, 3]).shape == (3, m.spec.vocab_size)


def test_not_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="not a model directory"):
        moetier.load(tmp_path / "nope")


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(WeightError, match=r"tokenizer\.json"):
        moetier.load(ckpt)
    moetier.load(ckpt, tokenizer=False)  # ids-only use still works


def test_no_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(WeightError, match=r"no \*\.safetensors"):
        moetier.load(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightError, match=r"model\.safetensors: tensor '.*'.*truncated"):
        moetier.load(ckpt)


def test_corrupt_header_json(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"}}}}"
    f.write_bytes(bytes(data))
    with pytest.raises(WeightError, match="not valid JSON"):
        moetier.load(ckpt)


def test_header_length_past_eof(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    f.write_bytes(bytes(data))
    with pytest.raises(WeightError, match="header length"):
        moetier.load(ckpt)


def test_bad_offsets(tmp_path):
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16)
    with pytest.raises(WeightError, match=r"tensor 'w': data_offsets \[0, 12\] span 12 bytes"):
        SafetensorsIndex(tmp_path)


def test_missing_tensor(ckpt):
    f = ckpt / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.self_attn.k_norm.weight"]
    save_file(sd, f)
    with pytest.raises(WeightError, match=r"'model\.layers\.1\.self_attn\.k_norm\.weight' is missing"):
        moetier.load(ckpt)


def test_missing_expert(ckpt):
    f = ckpt / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(sd, f)
    with pytest.raises(WeightError, match=r"experts\.5\.up_proj\.weight' is missing"):
        moetier.load(ckpt)


def test_shape_disagrees_with_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightError, match=r"experts\.0\.gate_proj\.weight' has shape \[32, 64\] but config"):
        moetier.load(ckpt)


def test_dense_shape_disagrees(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vocab_size"] = 320
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightError, match=r"has shape \[300, 64\] but config\.json implies \[320, 64\]"):
        moetier.load(ckpt)


@pytest.mark.parametrize(
    "name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"]
)
def test_nan_weights(ckpt, name):
    f = ckpt / "model.safetensors"
    sd = load_file(f)
    sd[name][0, 0] = float("nan")
    save_file(sd, f)
    with pytest.raises(WeightError, match=rf"'{name}' contains NaN"):
        moetier.load(ckpt)


def test_unsupported_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: unsupported model_type .gpt2."):
        moetier.load(ckpt)


def test_sharded_missing_shard(tmp_path):
    ck = make_tiny_checkpoint(tmp_path, "mixtral", max_shard_size="100KB")
    shards = sorted(ck.glob("model-*.safetensors"))
    assert len(shards) > 2
    full = moetier.load(ck, tokenizer=False).logits(list(range(20)))
    shards[1].unlink()
    msg = rf"{shards[1].name}: shard listed in model\.safetensors\.index\.json is missing"
    with pytest.raises(WeightError, match=msg):
        moetier.load(ck)
    assert torch.isfinite(full).all()


def test_index_names_wrong_file(tmp_path):
    ck = make_tiny_checkpoint(tmp_path, "llama", max_shard_size="60KB")
    idx = json.loads((ck / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    files = sorted(set(idx["weight_map"].values()))
    idx["weight_map"][name] = next(f for f in files if f != idx["weight_map"][name])
    (ck / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(WeightError, match="model.norm.weight"):
        moetier.load(ck)


def test_bad_dtype_option(ckpt):
    with pytest.raises(MoetierError, match="dtype 'float16'"):
        moetier.load(ckpt, dtype="float16")


def test_read_rows_reads_one_expert(tmp_path):
    t = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3, 2)
    save_file({"experts": t, "b": torch.ones(5, dtype=torch.bfloat16)}, tmp_path / "x.safetensors")
    idx = SafetensorsIndex(tmp_path)
    assert torch.equal(idx.read_rows("experts", 2), t[2])
    assert torch.equal(idx.read("b"), torch.ones(5, dtype=torch.bfloat16))
    with pytest.raises(WeightError, match="has no row 4"):
        idx.read_rows("experts", 4)


def test_quantized_checkpoints_validated_up_front(tmp_path):
    from tests.helpers.quantized import make_quantized_checkpoint

    ck = make_quantized_checkpoint(tmp_path, "qwen3_moe", "int4", group=32)
    f = ck / "model.safetensors"
    name = "model.layers.1.mlp.experts.3.down_proj"
    sd = load_file(f)
    good = sd[f"{name}.weight_scale"]
    sd[f"{name}.weight_scale"] = good[:, :0].contiguous()
    save_file(sd, f)
    with pytest.raises(WeightError, match=rf"model\.safetensors: tensor '{name}\.weight_packed': .*does not fit"):
        moetier.load(ck)
    sd[f"{name}.weight_scale"] = torch.cat([good, good])
    save_file(sd, f)
    msg = rf"tensor '{name}\.weight_packed': weight_scale is torch.bfloat16 \[128, 1\]"
    with pytest.raises(WeightError, match=msg):
        moetier.load(ck)
    sd[f"{name}.weight_scale"] = good
    del sd[f"{name}.weight_shape"]
    save_file(sd, f)
    with pytest.raises(WeightError, match=rf"'{name}\.weight_packed': pack-quantized weight without .*weight_shape"):
        moetier.load(ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"quantization_config\.quant_method' is 'awq'"):
        moetier.load(ck)

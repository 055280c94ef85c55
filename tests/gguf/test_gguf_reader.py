"""GGUF reader: split files, refused types, missing parts, the CLI and the hierarchy on the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moetier
from moetier.cli import main as cli
from moetier.errors import MoetierError, WeightError
from moetier.weights.gguf_io import GGUFIndex, hf_names, unpermute_rows
from tests.gguf.helpers import fixture, rewrite_gguf

pytest.importorskip("gguf", reason="the gguf extra (pip install moetier[gguf]) is not installed")

PROMPT = [5, 17, 40, 99, 3, 250, 12, 7]


def test_split_gguf_loads_like_the_single_file(tmp_path: Path) -> None:
    rewrite_gguf(fixture("qwen3moe-bf16"), tmp_path / "m.gguf", split_max_tensors=10)
    parts = sorted(p.name for p in tmp_path.glob("*.gguf"))
    assert parts == ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]
    one = moetier.load(fixture("qwen3moe-bf16"), dtype="float32", tokenizer=False)
    split = moetier.load(tmp_path / parts[0], dtype="float32", tokenizer=False)
    assert split.spec.name == "m"
    assert torch.equal(one.logits(PROMPT), split.logits(PROMPT))
    (tmp_path / parts[1]).unlink()
    with pytest.raises(WeightError, match="m-00002-of-00003.gguf: part of the split GGUF"):
        GGUFIndex(tmp_path / parts[0])


def test_older_per_expert_mixtral_tensors(tmp_path: Path) -> None:
    rewrite_gguf(fixture("mixtral-bf16"), tmp_path / "old.gguf", unmerge_experts=True)
    idx = GGUFIndex(tmp_path / "old.gguf")
    assert "blk.0.ffn_gate.5.weight" in idx.gguf and "blk.0.ffn_gate_exps.weight" not in idx.gguf
    merged = moetier.load(fixture("mixtral-bf16"), dtype="float32", tokenizer=False)
    old = moetier.load(tmp_path / "old.gguf", dtype="float32", tokenizer=False)
    assert torch.equal(merged.logits(PROMPT), old.logits(PROMPT))


def test_unsupported_tensor_type_names_tensor_type_and_supported(tmp_path: Path) -> None:
    # an F32 norm relabelled I32 (same bytes): a type moetier refuses
    rewrite_gguf(fixture("qwen3moe-bf16"), tmp_path / "bad.gguf", retype={"blk.0.attn_norm.weight": 26})
    with pytest.raises(WeightError, match=r"bad\.gguf: tensor 'blk\.0\.attn_norm\.weight'.*type I32 is not "
                                          r"supported.*Q4_K.*MXFP4"):
        moetier.load(tmp_path / "bad.gguf", tokenizer=False)
    assert cli(["run", str(tmp_path / "bad.gguf"), "--prompt", "hi", "--max-tokens", "1"]) == 2


def test_not_a_gguf_file(tmp_path: Path) -> None:
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(WeightError, match="junk.gguf: not a valid GGUF file"):
        GGUFIndex(p)


def test_names_and_unpermute() -> None:
    assert hf_names("blk.3.ffn_gate_exps.weight") == ["model.layers.3.mlp.experts.gate_proj"]
    assert hf_names("blk.1.ffn_up.5.weight") == ["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    assert hf_names("blk.0.exp_probs_b.bias") == ["model.layers.0.mlp.gate.e_score_correction_bias"]
    assert hf_names("rope_freqs.weight") == []
    # the converter's permutation (HF [head, half, i] -> GGUF [head, i, half]) then ours undoes it
    n_head, d = 3, 8
    w = torch.arange(n_head * d)
    permuted = w.view(n_head, 2, d // 2).transpose(1, 2).reshape(-1)
    assert torch.equal(permuted[unpermute_rows(n_head * d, n_head)], w)


def test_merged_expert_rows_are_one_byte_range() -> None:
    idx = GGUFIndex(fixture("qwen3moe-bf16"))
    name = "model.layers.1.mlp.experts.down_proj"
    info = idx.info(name)
    E, H, I = info.shape
    full = idx.read(name)
    for e in (0, E - 1):
        assert torch.equal(idx.read_rows(name, e), full[e])
    assert info.nbytes == E * H * info.row_bytes


def test_hierarchy_reads_experts_from_the_gguf_file() -> None:
    ram = moetier.load(fixture("olmoe-bf16"), dtype="float32", tokenizer=False)
    tiered = moetier.load(fixture("olmoe-bf16"), dtype="float32", tokenizer=False, expert_cache=0.25)
    assert type(tiered.provider).__name__ == "TieredExpertProvider"
    assert torch.equal(ram.logits(PROMPT), tiered.logits(PROMPT))


def test_cli_run_census_on_gguf(capsys: pytest.CaptureFixture[str]) -> None:
    f = str(fixture("qwen3moe-bf16"))
    assert cli(["run", f, "--prompt", "hello world", "--max-tokens", "4", "--json"]) == 0
    assert cli(["census", f]) == 0
    out = capsys.readouterr().out
    assert "qwen3moe-bf16: qwen3_moe, 2 layers" in out


def test_missing_gguf_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "gguf":
            raise ModuleNotFoundError("No module named 'gguf'", name="gguf")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(MoetierError, match=r"pip install 'moetier\[gguf\]'"):
        GGUFIndex(fixture("qwen3moe-bf16"))


def test_serve_a_gguf_file_with_its_chat_template() -> None:
    import openai

    from moetier.cli import build_parser
    from moetier.commands.serve import _load_model
    from moetier.serve.app import BackgroundServer, build_app

    args = build_parser().parse_args(["serve", str(fixture("qwen3moe-q8_0")), "--max-ram", "2G"])
    model = _load_model(args)
    ref = moetier.load(fixture("qwen3moe-q8_0"))
    with BackgroundServer(build_app(model, model_name="g")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
        out = c.chat.completions.create(model="g", messages=[{"role": "user", "content": "hello"}], max_tokens=6,
                                        temperature=0)
    want = ref.generate([{"role": "user", "content": "hello"}], max_tokens=6)
    assert want and out.choices[0].message.content == want
    assert cli(["serve", str(fixture("qwen3moe-q8_0")) + ".missing"]) == 2


def test_census_of_a_gguf_counts_its_stored_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    f = fixture("qwen3moe-kquant")
    assert cli(["census", str(f), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    idx = GGUFIndex(f)
    assert d["total_bytes"] == sum(i.nbytes for i in idx.gguf.values())
    assert d["precision"] == "as stored in the GGUF file"
    assert cli(["census", str(f)]) == 0
    out = capsys.readouterr().out
    assert "q2_k+q3_k+q4_k" in out and "routed" in out


def test_plan_of_a_gguf_uses_its_stored_bytes_and_types(capsys: pytest.CaptureFixture[str]) -> None:
    """`moetier plan MODEL.gguf` plans the file's own bytes (a mix of k-quant types per group),
    not the spec's float dtype; its census bytes per group are the file's."""
    import json

    from moetier.planner.census import census
    from moetier.spec import load_spec
    from moetier.weights.gguf_io import _census_group, file_precision

    f = fixture("qwen3moe-kquant")
    idx = GGUFIndex(f)
    stored: dict[str, int] = {}
    for i in idx.gguf.values():
        g = _census_group(i.gguf_name)
        stored[g] = stored.get(g, 0) + i.nbytes
    assert cli(["plan", str(f), "--machine", "cpu", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["precision"] == "as stored in the GGUF file"
    assert d["bytes"]["routed"] == pytest.approx(stored["routed_experts"], rel=1e-12)
    spec = load_spec(f)
    prec = file_precision(f, spec)
    c = census(spec, prec)
    for g, b in stored.items():
        assert c.groups[g].bytes == pytest.approx(b, rel=1e-12), g
    # each group's planner format is a type the group holds (for its kernel rate and FLOPs)
    assert prec.format_of("routed_experts") in {"q2_k", "q3_k", "q4_k"}
    # as asked, a precision still overrides the file
    assert cli(["plan", str(f), "--machine", "cpu", "--json", "--precision", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"]["routed"] != pytest.approx(stored["routed_experts"])


def test_ggml_block_bytes_match_the_reader() -> None:
    """The planner's torch-free GGUF block table equals the reader's block layouts."""
    from moetier.planner.census import GGML_FORMAT_BYTES, parse_precision
    from moetier.quant.ggml import BY_TYPE

    want = {f.name: f.type_size / f.block_size for f in BY_TYPE.values() if f.name != "ggml_mxfp4"}
    assert GGML_FORMAT_BYTES == want
    assert parse_precision("mixed:experts=q4_k,default=q8_0").bytes_per_param("routed_experts") == 144 / 256

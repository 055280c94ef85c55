"""Build a large qwen3_moe checkpoint that routes like a trained model (for bench_hierarchy).

Takes a small trained qwen3_moe checkpoint (default: the embedded model) and makes it big
without touching what decides the routing:

* every decoder layer is repeated ``--repeat`` times in order (layer i of the output is
  source layer ``i % L``... repeated block-wise: 0..L-1, 0..L-1, ...), attention, norms and
  routers copied unchanged;
* every routed expert is widened from ``I`` to ``--expert-inter`` intermediate units: the
  trained gate/up rows and down columns are kept, the extra units get random gate/up rows
  and down columns scaled by ``--extra-scale`` (small), so each expert is ``3 * H * I'``
  real bytes that the runtime must read and multiply.

Routers, embeddings and the LM head are the trained ones, so the routing distribution
(skew, temporal locality) is the trained model's (perturbed only slightly by the small
extra units). Written as bf16, one shard per decoder layer plus one for the rest, with
``model.safetensors.index.json``; tokenizer files and the routing profile are copied
(the profile's rows are tiled to the repeated layers).

    python scripts/make_wide_model.py --src moetier/data/embedded --out /tmp/wide --target-gb 8.5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EXP = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def load_source(src: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def experts_of(sd: dict[str, torch.Tensor], layer: int, n_exp: int, inter: int) -> list[tuple[torch.Tensor, ...]]:
    """[(gate [I,H], up [I,H], down [H,I])] of one source layer (per-expert or fused layout)."""
    p = f"model.layers.{layer}.mlp.experts"
    if f"{p}.0.gate_proj.weight" in sd:
        return [(sd[f"{p}.{e}.gate_proj.weight"], sd[f"{p}.{e}.up_proj.weight"], sd[f"{p}.{e}.down_proj.weight"])
                for e in range(n_exp)]
    if f"{p}.gate_up_proj" in sd:
        gu, dn = sd[f"{p}.gate_up_proj"], sd[f"{p}.down_proj"]
        return [(gu[e, :inter], gu[e, inter:], dn[e]) for e in range(n_exp)]
    return [(sd[f"{p}.gate_proj"][e], sd[f"{p}.up_proj"][e], sd[f"{p}.down_proj"][e]) for e in range(n_exp)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "moetier" / "data" / "embedded"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeat", type=int, default=4, help="repeat the decoder layers this many times")
    ap.add_argument("--expert-inter", type=int, default=0,
                    help="widened expert intermediate size (0: from --target-gb)")
    ap.add_argument("--target-gb", type=float, default=8.5,
                    help="routed-expert bytes to reach when --expert-inter is 0")
    ap.add_argument("--extra-scale", type=float, default=0.02, help="std multiplier of the extra down columns")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "qwen3_moe":
        raise SystemExit(f"{src}: expected a qwen3_moe checkpoint, got {cfg.get('model_type')}")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moetier.spec import load_spec

    spec = load_spec(src)  # one parser of config.json (num_experts vs num_local_experts, ...)
    H, L, E, I0 = spec.hidden_size, spec.num_layers, spec.num_experts, spec.expert_intermediate_size
    L2 = L * args.repeat
    I2 = args.expert_inter or int(args.target_gb * 1e9 / (L2 * E * 3 * H * 2)) // 64 * 64
    if I2 < I0:
        raise SystemExit(f"--expert-inter {I2} is below the source's {I0}")
    sd = load_source(src)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    weight_map: dict[str, str] = {}
    n_shards = L2 + 1
    shard = lambda i: f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731
    # non-layer tensors
    rest = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items() if not k.startswith("model.layers.")}
    save_file(rest, out / shard(0), metadata={"format": "pt"})
    weight_map.update({k: shard(0) for k in rest})
    extra = I2 - I0
    for li in range(L2):
        s = li % L
        tens: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            m = LAYER.match(k)
            if not m or int(m.group(1)) != s or EXP.match(k) or FUSED.match(k):
                continue
            tens[f"model.layers.{li}.{m.group(2)}"] = v.to(torch.bfloat16).contiguous()
        for e, (g, u, d) in enumerate(experts_of(sd, s, E, I0)):
            gs, us, ds = (float(t.float().std()) for t in (g, u, d))
            ge = torch.randn(extra, H, generator=gen) * gs
            ue = torch.randn(extra, H, generator=gen) * us
            de = torch.randn(H, extra, generator=gen) * (ds * args.extra_scale)
            p = f"model.layers.{li}.mlp.experts.{e}"
            tens[f"{p}.gate_proj.weight"] = torch.cat([g.float(), ge]).to(torch.bfloat16)
            tens[f"{p}.up_proj.weight"] = torch.cat([u.float(), ue]).to(torch.bfloat16)
            tens[f"{p}.down_proj.weight"] = torch.cat([d.float(), de], dim=1).to(torch.bfloat16)
        save_file(tens, out / shard(li + 1), metadata={"format": "pt"})
        weight_map.update({k: shard(li + 1) for k in tens})
        fd = os.open(out / shard(li + 1), os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        print(f"layer {li + 1}/{L2} written", flush=True)
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg2 = dict(cfg, num_hidden_layers=L2, moe_intermediate_size=I2)
    cfg2["dtype" if "dtype" in cfg else "torch_dtype"] = "bfloat16"
    for k in ("max_window_layers",):
        if k in cfg2:
            cfg2[k] = L2
    if isinstance(cfg2.get("layer_types"), list):
        cfg2["layer_types"] = (cfg2["layer_types"] * args.repeat)[:L2]
    if isinstance(cfg2.get("mlp_only_layers"), list):
        cfg2["mlp_only_layers"] = sorted({x + r * L for x in cfg2["mlp_only_layers"] for r in range(args.repeat)})
    (out / "config.json").write_text(json.dumps(cfg2, indent=1))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "special_tokens_map.json"):
            shutil.copy(f, out / f.name)
    prof = src / "routing_profile.json"
    if prof.is_file():
        data = json.loads(prof.read_text())
        if isinstance(data.get("layers"), list):  # moetier.routing_profile/1: one entry per layer
            rows = data["layers"]
            data["layers"] = [dict(rows[i % len(rows)], layer=i) for i in range(L2)]
            data["num_layers"] = L2
            data["moe_layers"] = list(range(L2))
            data["description"] = (data.get("description", "") + f" (layers tiled x{args.repeat} by "
                                   "make_wide_model.py)")
        (out / "routing_profile.json").write_text(json.dumps(data))
    print(json.dumps({"out": str(out), "layers": L2, "experts": E, "expert_inter": I2, "bytes_on_disk": total}))


if __name__ == "__main__":
    main()

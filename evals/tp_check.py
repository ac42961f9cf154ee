"""SinkCache under transformers' tensor parallelism: sharded greedy tokens equal the unsharded run.

    torchrun --nproc-per-node 2 evals/tp_check.py --model DIR [--out tp.json]

``DIR`` is a local checkpoint (``save_pretrained``). Every rank loads it twice: sharded
(``from_pretrained(DIR, tp_plan="auto")``: each rank holds its own attention heads, so its
SinkCache holds only those heads' compressed keys and values) and whole, and generates greedily
with each policy (``full``, ``quantize`` with the first token or measured sinks kept exact, ``evict`` scored by key norm and by the newest query's
attention) from the same prompt. The check passes when
every policy's sharded tokens equal its unsharded tokens. Rank 0 writes the JSON report
(device, dtype, world size, versions and per-rank cache heads read back from what ran).

Backend: NCCL on CUDA, gloo on CPU (``--device cpu``, the default without CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

POLICIES: dict[str, dict[str, Any]] = {
    "full": {"policy": "full"},
    "quantize": {"policy": "quantize", "bits": 4, "window": 8, "group_size": 8, "sinks": "first"},
    "quantize-auto-sinks": {"policy": "quantize", "bits": 4, "window": 8, "group_size": 8, "sinks": "auto"},
    "evict": {"policy": "evict", "budget": 24, "window": 8, "sinks": "first", "score": "keynorm"},
    "evict-tova": {"policy": "evict", "budget": 24, "window": 8, "sinks": "first", "score": "tova"},
}


def _generate(model: Any, ids: Any, cache_kw: dict[str, Any], new_tokens: int, tok: Any) -> tuple[list[int], dict[str, Any]]:
    import torch

    from sinkcache import SinkCache

    cache = SinkCache(**cache_kw, model=model, tokenizer=tok)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    # the bytes this rank's cache holds: a rank of N holds 1/N of the heads, so 1/N of the bytes
    return out[0, ids.shape[1]:].tolist(), {"memory_bytes": int(cache.memory_bytes())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="local checkpoint dir (save_pretrained)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated: {', '.join(POLICIES)}")
    ap.add_argument("--out", default=None, help="rank 0 writes the JSON report here")
    args = ap.parse_args(argv)
    bad = [p for p in args.policies.split(",") if p not in POLICIES]
    if bad:
        ap.error(f"--policies {','.join(bad)}: allowed: {', '.join(POLICIES)}")

    import torch
    import torch.distributed as dist
    import transformers

    from sinkcache.placement import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        ap.error(str(exc))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        ap.error("launch with torchrun --nproc-per-node N (N >= 2): nothing is sharded in one process")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    dtype = getattr(torch, args.dtype)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    sharded = transformers.AutoModelForCausalLM.from_pretrained(args.model, tp_plan="auto", dtype=dtype).eval()
    whole = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, int(whole.config.vocab_size), (1, args.prompt_tokens), generator=g).to(dev)

    rows: dict[str, Any] = {}
    for name in args.policies.split(","):
        t_whole, c_whole = _generate(whole, ids, POLICIES[name], args.new_tokens, tok)
        t_shard, c_shard = _generate(sharded, ids, POLICIES[name], args.new_tokens, tok)
        rows[name] = {
            "equal": t_whole == t_shard, "tokens_unsharded": t_whole, "tokens_sharded": t_shard,
            "cache_unsharded": c_whole, "cache_sharded": c_shard,
        }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    p = next(sharded.parameters())
    report = {
        "ok": all(r[name]["equal"] for r in gathered for name in r),
        "world_size": world,
        "device": str(p.device).split(":")[0], "dtype": str(p.dtype).removeprefix("torch."),  # read back from the sharded model
        "backend": dist.get_backend(),
        "tp_size": getattr(sharded, "tp_size", None),
        "model": str(Path(args.model)),
        "kv_heads": int(whole.config.num_key_value_heads),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "per_rank": gathered,
    }
    if rank == 0:
        text = json.dumps(report, indent=1)
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(json.dumps({k: report[k] for k in ("ok", "world_size", "device", "dtype", "backend", "tp_size")}))
        for name, r in gathered[0].items():
            mem = r["cache_sharded"]["memory_bytes"] / max(1, r["cache_unsharded"]["memory_bytes"])
            print(f"{name}: equal={r['equal']} rank 0 holds {mem:.3f} of the unsharded cache's bytes ({report['kv_heads']} KV heads)")
    dist.destroy_process_group()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""kvpress peer worker: runs NVIDIA kvpress presses for ``sinkcache compare`` in a separate virtualenv.

kvpress 0.5.x pins ``transformers<5.3``, so it cannot share sinkcache's environment (transformers
5.23). ``sinkcache compare`` starts this script with the kvpress venv's Python and talks to it over
stdin/stdout, one JSON object per line. The main environment tokenizes (so the token ids fed to the
model are exactly the main environment's) and scores with lm-eval's task definitions; this worker
only runs the model:

* ``{"op": "score", "ctx": [ids], "conts": [[ids], ...]}``: prefill ``ctx`` under the press
  (compressing it), then for each continuation feed ``conts[i]`` (the last context token plus the
  continuation minus its last token) against the compressed cache and return the summed log-prob of
  ``targets[i]`` and whether it is the greedy continuation. The cache is cut back to the compressed
  context between continuations (as kvpress's pipeline does between questions).
* ``{"op": "generate", "ctx": [ids], "last": id, "max_new": n, "stop_ids": [ids]}``: prefill and
  compress ``ctx``, then decode greedily from ``last`` (kvpress's pipeline decoding: true
  positions, no compression while decoding) until a stop id or ``max_new`` tokens.
* ``{"op": "exit"}``: reply with the peak RSS and quit.

Each reply carries ``memory`` (bytes of the key/value tensors actually held after the request) and
``dense`` (what an uncompressed cache would hold for the same tokens), like sinkcache's own
accounting. Usage: ``python kvpress_worker.py --model DIR --press snapkv --ratio 0.5``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import sys
import time

import torch

PRESSES = {
    "streaming_llm": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
    "expected_attention": "ExpectedAttentionPress",
}


class _RopeFor(torch.nn.Module):
    """``rotary_emb(x, position_ids)`` bound to one layer type of a per-layer-type RoPE module."""

    def __init__(self, rope: torch.nn.Module, layer_type: str) -> None:
        super().__init__()
        self.rope, self.layer_type = rope, layer_type

    def forward(self, x, position_ids):
        return self.rope(x, position_ids, layer_type=self.layer_type)


def _layer_kv(cache, i):
    layer = cache.layers[i]
    return layer.keys, layer.values


def _cache_bytes(cache) -> int:
    total = 0
    for i in range(len(cache.layers)):
        k, v = _layer_kv(cache, i)
        for t in (k, v):
            if t is not None and t.dim() == 4:
                total += t.numel() * t.element_size()
    return total


class Worker:
    def __init__(self, model_dir: str, press: str, ratio: float, threads: int, device: str = "cpu", dtype: str = "float32") -> None:
        import kvpress
        import transformers

        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device).eval()
        cfg = self.model.config.get_text_config(decoder=True)
        self.layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
        self.sliding_window = getattr(cfg, "sliding_window", None)
        self.press = getattr(kvpress, PRESSES[press])(compression_ratio=ratio) if ratio > 0 else None
        self.versions = {"kvpress": _version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__}
        p = next(self.model.parameters())
        # read back from the loaded model, not from the arguments
        self.placement = {"device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
                          "torch": torch.__version__, "transformers": transformers.__version__}
        self.seen = 0
        self.tok_bytes = 0

    # -- pieces ------------------------------------------------------------------------------------
    def _press_ctx(self):
        """Hooks on the attention layers, as ``press(model)`` does; Gemma 3's sliding layers are
        skipped (kvpress does the same for Gemma3ForConditionalGeneration, not for the text-only
        Gemma3ForCausalLM we run), since a sliding-window layer keeps its own window anyway."""
        import contextlib

        press = self.press
        if press is None:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def ctx():
            press.post_init_from_model(self.model)
            lm = self.model.model
            per_type = "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters
            hooks = []
            try:
                for layer in lm.layers:
                    if getattr(layer.self_attn, "is_sliding", False):
                        continue
                    # Gemma 3 keeps one RoPE per layer type and needs to be told which (kvpress
                    # calls module.rotary_emb(x, pos) without it, e.g. in ExpectedAttentionPress).
                    layer.self_attn.rotary_emb = _RopeFor(lm.rotary_emb, "full_attention") if per_type else lm.rotary_emb
                    hooks.append(layer.self_attn.register_forward_hook(press.forward_hook, with_kwargs=True))
                yield
            finally:
                for h in hooks:
                    h.remove()

        return ctx()

    def _prefill(self, ctx: list[int]):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([ctx], dtype=torch.long, device=self.device)
        with torch.no_grad(), self._press_ctx():
            self.model.model(input_ids=ids, past_key_values=cache)
        k, _ = _layer_kv(cache, self._first_full())
        self.tok_bytes = 2 * k.shape[1] * k.shape[3] * k.element_size()  # K+V bytes per token per layer
        return cache

    def _first_full(self) -> int:
        return next(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    def _dense(self, seen: int, cache) -> int:
        """Bytes an uncompressed DynamicCache holds after ``seen`` tokens: ``seen`` tokens per
        full-attention layer; sliding-window layers (never compressed here) as they are."""
        total = 0
        for i, t in enumerate(self.layer_types):
            if t == "full_attention":
                total += seen * self.tok_bytes
            else:
                k, v = _layer_kv(cache, i)
                total += sum(x.numel() * x.element_size() for x in (k, v) if x is not None and x.dim() == 4)
        return total

    def _forward(self, cache, ids: list[int], start: int, logits_to_keep: int = 0):
        pos = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        with torch.no_grad():
            out = self.model(
                input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                past_key_values=cache,
                position_ids=pos,
                logits_to_keep=logits_to_keep,
            )
        return out.logits[0]

    # -- ops ------------------------------------------------------------------------------------------
    def score(self, req: dict) -> dict:
        ctx = req["ctx"]
        cache = self._prefill(ctx)
        lengths = [cache.layers[i].keys.shape[-2] for i in range(len(cache.layers))]
        results, mems, denses = [], [], []
        for feed, target in zip(req["conts"], req["targets"], strict=True):
            logits = self._forward(cache, feed, len(ctx))
            logp = torch.log_softmax(logits.float(), dim=-1)[: len(target)]
            tgt = torch.tensor(target, dtype=torch.long, device=logp.device)
            greedy = bool((logp.argmax(-1) == tgt).all())
            results.append([float(logp.gather(-1, tgt.unsqueeze(-1)).sum()), greedy])
            mems.append(_cache_bytes(cache))
            denses.append(self._dense(len(ctx) + len(feed), cache))
            for i, n in enumerate(lengths):  # cut the continuation back out (kvpress pipeline does the same)
                layer = cache.layers[i]
                if self.layer_types[i] == "full_attention":
                    layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
            if any(t != "full_attention" for t in self.layer_types):
                cache = self._prefill(ctx)  # sliding layers cannot be cut back; prefill again
        return {"results": results, "memory": mems, "dense": denses}

    def generate(self, req: dict) -> dict:
        ctx = req["ctx"]
        cache = self._prefill(ctx)
        stop = set(req.get("stop_ids") or [])
        pos = len(ctx)
        tok = int(req["last"])
        out: list[int] = []
        for _ in range(int(req["max_new"])):
            logits = self._forward(cache, [tok], pos, logits_to_keep=1)
            tok = int(logits[-1].argmax())
            out.append(tok)
            pos += 1
            if tok in stop:
                break
        return {"tokens": out, "memory": [_cache_bytes(cache)], "dense": [self._dense(pos, cache)]}


def _version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # pragma: no cover
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint dir (from_pretrained)")
    ap.add_argument("--press", required=True, choices=sorted(PRESSES))
    ap.add_argument("--ratio", type=float, required=True, help="kvpress compression_ratio (fraction removed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available to this worker; allowed here: cpu")
    worker = Worker(args.model, args.press, args.ratio, args.threads, args.device, args.dtype)
    out = sys.stdout
    sys.stdout = sys.stderr  # keep library prints off the protocol channel
    press = worker.press
    built = {
        "package": "kvpress",
        "press_class": type(press).__name__ if press is not None else None,  # None: ratio 0 runs no press
        "compression_ratio": float(getattr(press, "compression_ratio", 0.0)) if press is not None else 0.0,
    }
    out.write(json.dumps({"ready": True, "versions": worker.versions, "placement": worker.placement, "press": built, "load_s": time.perf_counter() - t0}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "exit":
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out.write(json.dumps({"peak_rss_bytes": rss}) + "\n")
            out.flush()
            return
        try:
            reply = worker.score(req) if op == "score" else worker.generate(req)
        except Exception as exc:  # report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

"""The ``sinkcache`` command line: ``generate`` and ``demo`` (more subcommands can plug in).

Each subcommand is one ``_add_<name>`` function that builds its parser and one ``_cmd_<name>``
function that runs it; :data:`_COMMANDS` lists them, so adding ``eval``/``bench``/... later means
adding two functions and one entry.

Errors a user can fix (bad options, missing models) are printed as one ``sinkcache: error: ...``
line with exit status 2; set ``SINKCACHE_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

from ._console import format_stats

PROG = "sinkcache"
DEBUG_ENV = "SINKCACHE_DEBUG"

POLICIES = ("full", "evict", "quantize", "hybrid")
SINK_MODES = ("auto", "first", "punct", "none")
SCORE_NAMES = ("keynorm", "tova", "snapkv", "h2o", "tova-pooled", "vatp", "tova-span")  # sinkcache.scores.SCORE_NAMES (the CLI imports no torch to parse)
BITS = (2, 4, 8)
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto")


def _wrap(text: str, width: int = 78) -> str:
    """Fill each paragraph of a description (RawDescriptionHelpFormatter keeps our paragraphs)."""
    return "\n\n".join(textwrap.fill(" ".join(par.split()), width) for par in text.split("\n\n"))


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage block is what ``--help`` is for)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show ``(default: X)`` for every option, except where ``None`` means "the policy decides"
    (those options spell their effective default out in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# --------------------------------------------------------------------------- argument types


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _numbers(conv: Callable[[str], Any], what: str) -> Callable[[str], list]:
    """A comma-separated list of numbers (``50,25,12.5``; a trailing ``%`` is allowed)."""

    def parse(text: str) -> list:
        out = []
        for part in (t.strip().rstrip("%") for t in text.split(",")):
            if not part:
                continue
            try:
                out.append(conv(part))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{part!r} is not {'an' if what[0] in 'aeiou' else 'a'} {what}; give comma-separated {what}s, e.g. {_EXAMPLES[conv]}"
                ) from None
        if not out:
            raise argparse.ArgumentTypeError(f"no {what}s in {text!r}")
        return out

    parse.__name__ = f"list of {what}s"
    return parse


_EXAMPLES: dict[Any, str] = {float: "50,25,12.5", int: "1024,2048"}
_int_list = _numbers(int, "integer")
_float_list = _numbers(float, "number")


def _probability(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _dtype(text: str) -> str:
    if text.strip().lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"unsupported dtype {text!r}; allowed: {', '.join(DTYPES)}")
    return text.strip().lower()


def default_threads() -> int:
    """Torch threads a command uses unless told: one per core, at most 4.

    On the 2-core machine `sinkcache demo` ran faster with 2 threads than with 1, with the same
    answers (an earlier, uncommitted timing; evals/results/demo/demo.txt is the committed run). The
    cap of 4 is a guard for many-core hosts (small models gain little from more threads), not a
    measurement. On a busy machine `--threads 1` can be faster."""
    return max(1, min(4, os.cpu_count() or 1))


def _threads_in_use() -> int:
    import torch

    return torch.get_num_threads()


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype", type=_dtype, default="float32", metavar="DTYPE", help=f"model dtype: {', '.join(DTYPES)}"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"CPU threads for torch (default: one per core, at most 4; here {default_threads()}); on a busy machine 1 can be faster",
    )


def _add_placement_options(p: argparse.ArgumentParser, *, dtype_replaces: bool = False) -> None:
    """``--device`` and ``--dtype`` (default: CUDA and bfloat16 when CUDA is available, else CPU
    and float32); ``dtype_replaces``: the parser already has ``--dtype``, only its default changes."""
    p.add_argument("--device", default=None, metavar="DEVICE", help="auto, cpu, cuda or cuda:N (default: CUDA when available)")
    help_dtype = f"model dtype: {', '.join(DTYPES)} (default: bf16 on CUDA, float32 on CPU)"
    if dtype_replaces:
        for action in p._actions:
            if action.dest == "dtype":
                action.default, action.help = None, help_dtype
    else:
        p.add_argument("--dtype", type=_dtype, default=None, metavar="DTYPE", help=help_dtype)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads (default :func:`default_threads`) for the duration of a command,
    then restore the old count (main() may run inside a longer-lived process, such as a test session)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(default_threads() if n is None else n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- generate


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from .aliases import list_aliases

    p = sub.add_parser(
        "generate",
        help="generate text with a compressed KV cache and print the cache statistics",
        description=_wrap(
            "Generate a continuation of PROMPT with MODEL, keeping the KV cache compressed with the "
            "chosen policy. The text goes to stdout; cache statistics and speed go to stderr."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help=f"built-in alias ({', '.join(list_aliases())}), path to a .gguf file, local checkpoint dir or hub id",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text ('-' reads it from stdin)")
    g = p.add_argument_group("cache")
    g.add_argument("--policy", choices=POLICIES, default="quantize", help="how the KV cache is compressed")
    g.add_argument(
        "--bits",
        type=int,
        choices=BITS,
        default=None,
        help="quantization width for quantize/hybrid (default: 4)",
    )
    g.add_argument(
        "--budget",
        type=_positive_int,
        default=None,
        metavar="N",
        help="tokens kept per layer, sinks and window included; required by evict/hybrid (default: none)",
    )
    g.add_argument(
        "--window",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="recent tokens kept exact (default: 128 for quantize/hybrid, min(256, budget // 2) for evict)",
    )
    g.add_argument(
        "--group-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="tokens per quantization group for quantize/hybrid (default: 64)",
    )
    g.add_argument(
        "--refine",
        type=_probability,
        default=None,
        metavar="SHARE",
        help="quantize only: give the most attended SHARE (0-1] of each quantized block 2 more bits (default: off)",
    )
    g.add_argument(
        "--sinks",
        choices=SINK_MODES,
        default="first",
        help="attention-sink tokens kept exact: the first N (first), measured from attention (auto), punctuation (punct) or none",
    )
    g.add_argument(
        "--n-first",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="leading tokens that always count as sinks (default: 1; not with --sinks none)",
    )
    g.add_argument(
        "--score",
        choices=SCORE_NAMES,
        default=None,
        help="evict only: how held tokens are ranked (default: tova-pooled, the measured best; keynorm needs no queries)",
    )
    d = p.add_argument_group("decoding")
    d.add_argument(
        "--max-new-tokens", type=_positive_int, default=64, metavar="N", help="tokens to generate at most"
    )
    d.add_argument(
        "--chat", action="store_true", help="wrap PROMPT as a user message with the tokenizer's chat template"
    )
    d.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    d.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    d.add_argument(
        "--temperature",
        type=_positive_float,
        default=None,
        metavar="T",
        help="sampling temperature, needs --sample (default: 1.0)",
    )
    d.add_argument(
        "--top-p",
        type=_probability,
        default=None,
        metavar="P",
        help="nucleus sampling mass, needs --sample (default: 1.0)",
    )
    d.add_argument("--seed", type=int, default=0, metavar="N", help="random seed for --sample")
    _add_model_options(p)
    p.set_defaults(func=_cmd_generate)


def _cache_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """SinkCache knobs from the options; unset ones are left out (the policy's defaults apply,
    and SinkCache rejects knobs a policy does not use, e.g. --bits with evict)."""
    kw: dict[str, Any] = {"policy": args.policy, "sinks": args.sinks}
    for name in ("n_first", "bits", "budget", "window", "group_size", "score", "refine"):
        value = getattr(args, name, None)
        if value is not None:
            kw[name] = value
    return kw


def _check_cache_options(kw: dict[str, Any]) -> None:
    """Raise SinkCache's own ValueError for bad knobs *before* the (slow) model load.

    A cache built without a model runs every argument check; "punct" needs the tokenizer, so it
    is probed as "auto", which gets the same sink cap (the budget check depends only on that).
    """
    from . import SinkCache
    from .policies import make_policy

    probe = dict(kw)
    if probe.get("sinks") == "punct":
        probe["sinks"] = "auto"
    if probe.get("refine") is not None:
        # attention-ranked refinement needs the model's attention modules: check share and policy here
        from .refine import Refinement

        probe["refine"] = Refinement(probe["refine"], score="keynorm")
    if probe.get("score") is not None:
        # attention scorers need the model's attention modules: check the name and policy here
        make_policy(probe["policy"], **{k: probe[k] for k in ("bits", "budget", "window", "group_size", "score") if k in probe})
        probe.pop("score")
    SinkCache(**probe)


def _cmd_generate(args: argparse.Namespace) -> int:
    if not args.sample and (args.temperature is not None or args.top_p is not None):
        raise ValueError("--temperature and --top-p need --sample")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("PROMPT is empty: give the text to continue (or '-' to read it from stdin)")
    kw = _cache_kwargs(args)
    _check_cache_options(kw)

    import torch
    from transformers import TextStreamer

    from . import SinkCache
    from .models import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    inputs = _encode(tok, prompt, chat=args.chat, model_name=args.model)
    cache = SinkCache(**kw, model=model, tokenizer=tok)
    gen: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    if args.sample:
        torch.manual_seed(args.seed)
        gen["temperature"] = args.temperature if args.temperature is not None else 1.0
        gen["top_p"] = args.top_p if args.top_p is not None else 1.0
    if args.stream:
        gen["streamer"] = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    new_ids, seconds = _generate(model, inputs, cache, gen)
    if not args.stream:
        print(str(tok.decode(new_ids, skip_special_tokens=True)).strip())
    sys.stdout.flush()
    n_prompt = int(inputs["input_ids"].shape[1])
    print(
        f"\n[{len(new_ids)} new tokens after a {n_prompt}-token prompt in {seconds:.1f} s, "
        f"{len(new_ids) / seconds:.1f} tokens/s (prefill included)]",
        file=sys.stderr,
    )
    print(format_stats(cache.stats()), file=sys.stderr)
    return 0


def _encode(tok: Any, prompt: str, *, chat: bool, model_name: str) -> Any:
    """Tokenize ``prompt`` (as one user chat message when ``chat``) into model inputs."""
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{model_name!r} has no chat template (a base model?); drop --chat")
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    return tok(prompt, return_tensors="pt")


def _generate(model: Any, inputs: Any, cache: Any, gen: dict[str, Any]) -> tuple[list[int], float]:
    """Run ``model.generate`` with ``cache``; return the new token ids and the wall time."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, past_key_values=cache, **gen)
    seconds = time.perf_counter() - start
    return out[0, inputs["input_ids"].shape[1] :].tolist(), seconds


# --------------------------------------------------------------------------- demo


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import DEFAULT_BUDGET_PERCENT, DEFAULT_CONTEXT, DEFAULT_QUESTIONS, DEFAULT_SEED

    p = sub.add_parser(
        "demo",
        help="what sink-aware compression buys: accuracy vs KV bytes on seeded retrieval questions",
        description=_wrap(
            "Hide a 5-digit pass key in each of several long made-up reports (seeded), ask for it, and answer "
            "greedily with: the full cache, SinkCache() as shipped (int4), int2 with and without the first-token "
            "sink, sink-aware eviction vs StreamingLLM at the same budget, and transformers' QuantizedCache "
            "(quanto int4/int2). Questions the full cache gets wrong are dropped before the others run. "
            "Prints accuracy, KV bytes, compression ratio and tokens/s per cache, and saves a PNG of "
            "accuracy vs KV bytes."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="model alias, .gguf path, checkpoint dir or hub id")
    p.add_argument("--questions", type=_positive_int, default=DEFAULT_QUESTIONS, metavar="N", help="retrieval questions asked")
    p.add_argument("--context", type=_int_at_least(64), default=DEFAULT_CONTEXT, metavar="N", help="tokens per question's report")
    p.add_argument("--budget-percent", type=_positive_float, default=DEFAULT_BUDGET_PERCENT, metavar="P", help="eviction rows keep P%% of each prompt")
    p.add_argument("--score", default=None, choices=SCORE_NAMES, help="scorer of the sink-aware eviction row (default: the library's default)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the reports, keys and depths")
    p.add_argument("--plot", default="sinkcache_demo.png", metavar="PNG", help="where to save the accuracy vs KV bytes chart ('' for none)")
    _add_model_options(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.budget_percent > 100:
        raise ValueError(f"--budget-percent {args.budget_percent:g} must be in (0, 100]")
    from . import demo
    from .models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype)
    qs = demo.questions(tok, args.questions, args.context, args.seed)
    rows, notes = demo.demo_rows(model, tok, args.budget_percent, args.score)
    n_tok = [int(enc["input_ids"].shape[1]) for _, enc in qs]
    print(
        f"model: {args.model} ({args.dtype}, {_threads_in_use()} threads); {len(qs)} questions of "
        f"{min(n_tok)}-{max(n_tok)} tokens (seed {args.seed}); {demo.MAX_NEW_TOKENS} new tokens per answer"
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    kept, prefill_s = demo.run_demo(model, tok, qs, rows)
    print()
    print(demo.report(rows, len(kept), len(qs)))
    print(f"prompt forwards: {prefill_s:.1f} s in all (one per question for the SinkCache rows, one per quanto row)")
    if args.plot:
        path = demo.plot_demo(rows, args.plot, f"sinkcache demo: {args.model}, {len(kept)} of {len(qs)} pass-key questions")
        print(f"chart: {path}")
    print(f"[demo wall time {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- eval / detect / profile


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a cache policy with lm-evaluation-harness (offline suite or any lm-eval task)",
        description="Wraps lm_eval.simple_evaluate with the 'sinkcache' model; prints lm-eval's table and the "
        "KV memory held, and writes a JSON report.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", help="built-in alias, .gguf file, local dir or hub id")
    p.add_argument("--tasks", default="sinkcache_suite", help="comma-separated lm-eval task or group names; ruler_offline = lm-eval's RULER variants that run offline")
    p.add_argument("--ruler-lengths", type=_int_list, default="1024,2048", help="document lengths (tokens) for RULER tasks")
    p.add_argument("--policy", default="full", choices=["full", "evict", "quantize", "hybrid"], help="cache policy")
    p.add_argument("--policies", default=None, help="several policies (e.g. full,quantize,evict) scored from one prefill per request; each takes the knobs it uses")
    p.add_argument("--bits", type=int, default=None, help="quantization width (quantize/hybrid; policy default 4)")
    p.add_argument("--budget", type=int, default=None, help="tokens held per layer (evict/hybrid)")
    p.add_argument("--window", type=int, default=None, help="recent tokens kept exact (policy default)")
    p.add_argument("--group-size", type=int, default=None, help="quantization group size (policy default 64)")
    p.add_argument("--refine", type=_probability, default=None, metavar="SHARE", help="quantize only: the most attended SHARE of each quantized block gets 2 more bits (default: off)")
    p.add_argument("--sinks", default="first", choices=["auto", "first", "punct", "none"], help="sink selection")
    p.add_argument("--n-first", type=_non_negative_int, default=None, help="leading tokens that are always sinks (default: 1; not with --sinks none)")
    p.add_argument("--score", default=None, choices=SCORE_NAMES, help="evict only: eviction scorer (default tova-pooled, the measured best; keynorm needs no queries)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (int) or fraction (<1)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per batch (left-padded)")
    p.add_argument("--output", default=None, help="write the JSON report here")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    _add_model_options(p)
    _add_placement_options(p, dtype_replaces=True)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import print_report, run_eval

    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    result = run_eval(
        args.model,
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        policy=args.policy,
        bits=args.bits,
        budget=args.budget,
        window=args.window,
        group_size=args.group_size,
        sinks=args.sinks,
        n_first=args.n_first,
        score=args.score,
        refine=args.refine,
        limit=limit,
        output=args.output,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        apply_chat_template=args.chat,
        ruler_lengths=args.ruler_lengths,
        policies=None if args.policies is None else [t.strip() for t in args.policies.split(",") if t.strip()],
    )
    if "policies" in result:
        for name, rep in result["policies"].items():
            print(f"== policy {name} ==")
            print_report(rep)
        return 0
    print_report(result)
    return 0


def _add_detect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="find attention sinks per layer x head; write report.json, a heatmap and a token strip",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", help="built-in alias, .gguf file, local dir or hub id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", default=None, help="analyse this text file (default: held-out stdlib docstrings)")
    src.add_argument("--prompt", default=None, help="analyse this string")
    p.add_argument("--out", default="sink-report", help="output directory")
    p.add_argument("--max-tokens", type=int, default=None, help="truncate the text to this many tokens")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    _add_model_options(p)
    p.set_defaults(func=_cmd_detect)


def _cmd_detect(args: argparse.Namespace) -> int:
    from .analysis import detect_command

    kw = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
    return detect_command(
        args.model, text=args.text, prompt=args.prompt, out_dir=args.out, dtype=args.dtype, plots=not args.no_plots, **kw
    )


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="measure which token ids act as sinks in which layers on calibration text; save a profile JSON",
        description="A cache given profile=PATH (or the model's name, for shipped profiles) then picks sinks "
        "by token id at no runtime cost.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", help="built-in alias, .gguf file, local dir or hub id")
    p.add_argument("--out", default=None, help="profile JSON path (default: <model>.json in the current dir)")
    p.add_argument("--text", default=None, help="calibration text file (default: stdlib docstrings, calibration split)")
    _add_model_options(p)
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    from .profile import profile_command

    return profile_command(args.model, out=args.out, text=args.text, dtype=args.dtype)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="sweep cache policies (ours, baselines, transformers QuantizedCache, kvpress) x memory budgets",
        description="Runs every policy at every memory setting on the offline suite (one process per cell, "
        "resumable) and writes results.md, results.json and accuracy_vs_kv_memory.png. Eviction budgets are a "
        "percentage of each request's full KV; quantizers sweep bit widths; memory is measured.",
        formatter_class=_HelpFormatter,
    )
    from .compare.plan import (
        DEFAULT_BITS,
        DEFAULT_BUDGETS,
        DEFAULT_HYBRID_BITS,
        DEFAULT_RULER_LENGTHS,
        POLICIES,
        RULER_TASKS,
    )

    p.add_argument("model", help="built-in alias (smollm2-135m, gemma3-270m), local dir or .gguf")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies")
    p.add_argument("--budgets", type=_float_list, default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS), help="percent of each request's KV (eviction-type policies)")
    p.add_argument("--bits", type=_int_list, default=",".join(map(str, DEFAULT_BITS)), help="bit widths for quantizers")
    p.add_argument("--hybrid-bits", type=_int_list, default=",".join(map(str, DEFAULT_HYBRID_BITS)), help="bit widths for the hybrids")
    p.add_argument("--hybrid-budgets", type=_float_list, default=None, help="percent budgets for the hybrids (default: --budgets)")
    p.add_argument(
        "--tasks", default="suite",
        help=f"suite (the offline suite), ruler (lm-eval's offline RULER variants: {', '.join(RULER_TASKS)}), or a comma-separated "
        "list of suite tasks, RULER variants and TASK@LENGTH; RULER cells are separate cells (id suffix _ruler)",
    )
    p.add_argument("--ruler-lengths", type=_int_list, default=",".join(map(str, DEFAULT_RULER_LENGTHS)), help="RULER document lengths in tokens")
    p.add_argument("--limit", type=_positive_int, default=5, help="documents per task")
    p.add_argument("--seed", type=int, default=0, help="lm-eval seeds")
    p.add_argument("--jobs", type=_positive_int, default=1, help="processes at once (1 thread each); the forked in-package cells deal their documents over them")
    p.add_argument("--fork-shards", type=_positive_int, default=None, help="pieces the forked cells' documents are dealt into (default: --jobs); each finished piece is kept and reused, so more pieces make a long grid resumable in small steps")
    p.add_argument("--import", dest="import_dirs", action="append", default=[], metavar="DIR", help="copy the finished cells of another sweep's output folder into --out first, keeping its commands (repeatable)")
    p.add_argument("--report-only", action="store_true", help="run nothing: rewrite results.md/json and the plot from the finished cells in --out")
    p.add_argument("--no-fork", dest="fork", action="store_false", help="run every in-package cell with its own prefills (default: one shared prefill per request)")
    p.add_argument("--out", default=None, help="output dir (default: evals/results/<model>)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and exit")
    _add_placement_options(p)
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    from .compare import plan, run_compare
    from .compare.plan import expand_tasks, parse_list

    kw: dict[str, Any] = {
        "policies": parse_list(args.policies),
        "budgets": args.budgets,
        "bits": args.bits,
        "hybrid_bits": args.hybrid_bits,
        "tasks": expand_tasks(parse_list(args.tasks), args.ruler_lengths),
        "hybrid_budgets": args.hybrid_budgets,
    }
    cells = plan(**kw)
    if args.dry_run:
        for c in cells:
            print(f"{c.cell_id}\t{c.setting}\t{','.join(c.tasks)}")
        return 0
    argv = list(sys.argv[1:])
    res = run_compare(
        args.model, **kw, limit=args.limit, seed=args.seed, out_dir=args.out, jobs=args.jobs, fork=args.fork,
        fork_shards=args.fork_shards, report_only=args.report_only, import_dirs=args.import_dirs, device=args.device, dtype=args.dtype,
        command="sinkcache " + " ".join(shlex.quote(a) for a in argv),
    )
    if res.get("rank", 0) != 0:
        return 0  # a launch's other ranks ran their share; rank 0 merges, reports and says so
    print(
        f"{len(res['done'])} cells finished ({res['skipped']} reused), {len(res['failed'])} failed; "
        f"{res['reported']} cells reported in {res['out_dir']}/results.md"
    )
    return 1 if res["failed"] else 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="prefill time, decode tokens/s, KV bytes and peak RSS per cache, as ratios to DynamicCache",
        description="Measures every cache policy (and transformers' QuantizedCache/quanto as a peer) at several "
        "context lengths, interleaved with DynamicCache (A B A B), and writes results.json, results.md and "
        "decode_cost_vs_context.png. --quick takes a few minutes on 2 CPU cores.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", nargs="?", default="smollm2-135m", help="built-in alias, local dir or .gguf")
    p.add_argument("--quick", action="store_true", help="contexts 512,2048; 16 decode tokens; 2 reps; caches evict,int4,int2,quanto4")
    p.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default: preset)")
    p.add_argument("--caches", default=None, help="comma-separated cache names (default: preset; see results.json)")
    p.add_argument("--reps", type=_positive_int, default=None, help="repetitions (default: preset)")
    p.add_argument("--decode-tokens", type=_positive_int, default=None, help="greedy tokens timed per run")
    p.add_argument("--budget", type=_positive_int, default=1024, help="tokens per layer for evict/hybrid")
    p.add_argument("--dtype", type=_dtype, default=None, metavar="DTYPE", help=f"model dtype: {', '.join(DTYPES)} (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads while measuring")
    p.add_argument(
        "--throughput-mib", type=_positive_float, default=None, metavar="MIB",
        help="instead of the sweep: the largest batch each cache fits in MIB of KV at the first --contexts length, and the tokens/s it decodes",
    )
    p.add_argument("--max-batch", type=_positive_int, default=64, help="largest batch --throughput-mib tries")
    p.add_argument("--out", default="evals/results/bench", help="output directory")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from .bench import bench, format_rows

    res = bench(
        args.model,
        quick=args.quick,
        contexts=[int(c) for c in args.contexts.split(",")] if args.contexts else None,
        caches=[c.strip() for c in args.caches.split(",") if c.strip()] if args.caches else None,
        reps=args.reps,
        decode_tokens=args.decode_tokens,
        budget=args.budget,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        out_dir=args.out,
        command="sinkcache " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        throughput_mib=args.throughput_mib,
        max_batch=args.max_batch,
    )
    if "throughput" in res:
        from .throughput import to_markdown

        print(to_markdown(res["throughput"], res["meta"]))
        print(f"wrote {res['paths']['md']}, {res['paths']['json']}, {res['paths']['png']}")
        return 0
    print(format_rows(res["rows"]))
    print(f"wrote {res['paths']['md']}, {res['paths']['json']}, {res['paths']['png']}")
    return 0


# --------------------------------------------------------------------------- entry point

#: Parser builders of every subcommand, in --help order.
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_generate,
    _add_demo,
    _add_eval,
    _add_detect,
    _add_profile,
    _add_compare,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``sinkcache`` argument parser with all subcommands."""
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="Sink-aware KV-cache compression for Hugging Face transformers.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options. Set {DEBUG_ENV}=1 for tracebacks.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or runtime error, 130 Ctrl-C)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; keep main() returning an int
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        with _torch_threads(getattr(args, "threads", None)):
            return int(args.func(args))
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Run one offline task through lm_eval.simple_evaluate with the `sinkcache` model, from Python.

Run:  python examples/lm_eval_api.py [--model smollm2-135m] [--task sinkcache_passkey] [--limit 5]
Shows: importing sinkcache.evaluation registers the lm-eval model `sinkcache`; the task YAMLs of the
offline suite are found through sinkcache.evaluation.task_manager().
"""

from __future__ import annotations

import argparse

import lm_eval
from lm_eval.utils import make_table

from sinkcache.evaluation import task_manager  # importing registers the "sinkcache" model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sinkcache_passkey")
    ap.add_argument("--limit", type=int, default=5)
    args = ap.parse_args()

    results = lm_eval.simple_evaluate(
        model="sinkcache",
        model_args=f"pretrained={args.model},policy=quantize,bits=2,sinks=auto",
        tasks=[args.task],
        limit=args.limit,
        task_manager=task_manager(),
    )
    print(make_table(results))


if __name__ == "__main__":
    main()

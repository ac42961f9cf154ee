"""Wall time of ``sinkcache --help`` / ``--version`` / ``sinkcache eval --help`` (issue 13: <= 2 s).

    python evals/cli_startup.py --repeats 5 --out evals/results/bench/cli_startup.json

Each command runs in a fresh interpreter (what a user waits for), ``repeats`` times; the JSON keeps
every time, the median, the machine's load average before and after, and whether the CLI imported
torch (it must not, for these commands).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["--version"], ["eval", "--help"], ["compare", "--help"])
# Run the entry point the way the console script does, and report whether torch got imported.
_PROBE = "import sys; sys.argv = ['sinkcache', *sys.argv[1:]]\nfrom sinkcache.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED', file=sys.stderr)"


def time_command(args: list[str], repeats: int) -> dict:
    times, torch_seen = [], set()
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        torch_seen.add("TORCH_IMPORTED" in p.stderr)
        if p.returncode != 0:
            raise SystemExit(f"`sinkcache {' '.join(args)}` failed: {p.stderr.strip()[-300:]}")
    return {"command": "sinkcache " + " ".join(args), "seconds": times, "median_s": statistics.median(times),
            "imported_torch": sorted(torch_seen)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: must be >= 1")
    load_before = os.getloadavg()
    rows = [time_command(list(c), args.repeats) for c in COMMANDS]
    out = {"rows": rows, "repeats": args.repeats, "load_before": load_before, "load_after": os.getloadavg(),
           "python": sys.version.split()[0], "console_script": shutil.which("sinkcache")}
    for r in rows:
        print(f"{r['command']:<28} median {r['median_s']:.2f} s  (imported torch: {r['imported_torch']})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

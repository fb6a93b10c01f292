"""Cost of CURVE encryption on the push/pull cases, from interleaved plain/encrypted pairs.

One back-to-back run of each mode (``pushpull.py --curve``) is dominated by this VM's varying CPU
share; pairs run one after the other, each a fresh plain cluster then a fresh CURVE cluster (the
cases of benchmarks/pushpull.py), and the median of the pairs' slowdowns is reported.

Usage: python benchmarks/curve_pairs.py [--pairs 5] [--seconds 2]
       [--out benchmarks/results/curve_pairs.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import pushpull


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="time per case")
    p.add_argument("--out", default="benchmarks/results/curve_pairs.json")
    args = p.parse_args()
    pairs = []
    for i in range(args.pairs):
        plain = pushpull.run_cluster(args.seconds, True)
        curve = pushpull.run_cluster(args.seconds, False)
        pairs.append({k: 1 - curve[k]["ops_per_s"] / plain[k]["ops_per_s"]
                      for k in plain if isinstance(plain[k], dict)})
        print(i, {k: round(v, 3) for k, v in pairs[-1].items()}, flush=True)
    med = {k: round(statistics.median(p[k] for p in pairs), 3) for k in pairs[0]}
    print("median slowdown", med)
    Path(args.out).write_text(json.dumps({"pairs": pairs, "median_slowdown": med}, indent=1))


if __name__ == "__main__":
    main()

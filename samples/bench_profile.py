"""Profile the points a `moecc bench` run missed: samples/results/bench_profile.md (issue 16).

    python samples/bench_profile.py [--bench samples/results/bench.json] [--out samples/results]

Reads the bench's JSON, re-runs each missed point's fastest torch kernel under torch.profiler at the
point's thread count, and writes where its time goes (moecc.bench.profile)."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

from moecc.bench import profile, report
from moecc.bench.grid import SHAPES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", type=pathlib.Path, default=pathlib.Path("samples/results/bench.json"))
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("samples/results"))
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    results = json.loads(a.bench.read_text())
    load = os.getloadavg()
    t0 = time.strftime("%Y-%m-%dT%H:%M:%S")
    profiles = profile.run(results, report, SHAPES, a.repeats)
    md = profile.markdown(profiles, results)
    md += (f"\nProfiled {t0} from {a.bench} ({len(profiles)} missed points); load average before "
           f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f} (2 CPUs).\n")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_profile.md").write_text(md)
    (a.out / "bench_profile.json").write_text(json.dumps(profiles, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

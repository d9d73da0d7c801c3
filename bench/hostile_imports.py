"""Time and peak memory of every hostile predictor's refusal (issue 21's outer pickles, issue 29's storage bytes):

    python bench/hostile_imports.py

Each payload is measured in a fresh process (so that its peak RSS belongs to that refusal alone), after that
process has imported a real-size predictor once (imports and first-call allocations are not counted):
  parser ms / +MB   the refusal inside the caller's process (import_official_bytes: what the parser costs)
  isolated s / +MB  the refusal through import_official_isolated (what the CLI and the Import node run): wall
                    time including the child's start-up (Python and numpy: the child parses before it imports
                    torch, epd_core/tables/import_child.py), and the caller's peak RSS growth
The numbers depend on the machine; the tests assert the refusals, the messages and a +50 MB bound, not timings.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for bench and epd_core


def payloads() -> dict:
    from bench import hostile_pickles as h
    out = {f"[21] {title}": build for title, build in h.ATTACKS.items()}
    out.update({f"[29] {title}": (lambda b=build: h.storage_call(b()))
                for title, (build, _) in h.STORAGE_ATTACKS.items()})
    return out


def measure_one(title: str) -> dict:
    from epd_core.tables.import_official import EPDImportError, import_official_bytes, import_official_isolated
    from bench.official_pickle import official_pickle
    data = payloads()[title]()
    import_official_bytes(official_pickle())  # warm-up: imports and first-call allocations

    def refusal(convert):
        """(its error, or ACCEPTED; seconds; growth of this process's peak RSS in MB) of one conversion."""
        peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        try:
            convert(data, source="hostile.pkl")
            said = "ACCEPTED"
        except EPDImportError as e:
            said = str(e)
        return said, time.perf_counter() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    message, parser_s, parser_mb = refusal(import_official_bytes)
    isolated, isolated_s, isolated_mb = refusal(import_official_isolated)
    return {"bytes": len(data), "parser_ms": parser_s * 1e3, "parser_mb": parser_mb,
            "isolated_s": isolated_s, "isolated_mb": isolated_mb,
            "message": message, "same": message == isolated}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print("RESULT" + json.dumps(measure_one(sys.argv[2])))
        return 0
    print(f"{'payload':42s} {'bytes':>8s} {'parser ms':>9s} {'+MB':>5s} {'isolated s':>10s} {'+MB':>5s}  refusal")
    failed = 0
    for title in payloads():
        proc = subprocess.run([sys.executable, __file__, "--one", title], capture_output=True, text=True,
                              timeout=600, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
        if proc.returncode != 0 or not lines:
            failed += 1
            print(f"{title:42s} measurement failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
            continue
        r = json.loads(lines[0][len("RESULT"):])
        refusal = r["message"].split(": ", 1)[-1][:100] + ("" if r["same"] else "  [isolated differs]")
        print(f"{title:42s} {r['bytes']:8d} {r['parser_ms']:9.2f} {r['parser_mb']:5.1f} {r['isolated_s']:10.2f} "
              f"{r['isolated_mb']:5.1f}  {refusal}")
        failed += r["message"] == "ACCEPTED"
    print("parser: the refusal in the caller's process; isolated: through the child process the CLI and the Import "
          "node use (its time is mostly the child's start-up; it refuses before importing torch).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

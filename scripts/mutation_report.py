"""Summarise scripts/mutation.sh's mutmut runs: per module and in total, the kill rate and the
surviving mutants (with their diff), apart from the equivalent ones listed in
scripts/mutation_equivalent.txt.

    python scripts/mutation_report.py WORK_DIR EQUIVALENT_FILE MIN_SCORE SECONDS

WORK_DIR holds one scratch copy per module (with results.txt, `mutmut results --all true`).
Exit status 1 when the kill rate (equivalent mutants left out) is below MIN_SCORE percent.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

KILLED = {"killed", "timeout", "caught by type check", "segfault"}  # the tests noticed the mutant
IGNORED = {"skipped", "not checked"}  # not run at all: left out of the rate
LINE = re.compile(r"^\s*(\S+): (.+)$")


def read_equivalent(path: str) -> dict[str, str]:
    """{mutant name: reason} from lines `name  reason` (# starts a comment)."""
    out = {}
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                out[name] = reason.strip()
    return out


def read_results(path: str) -> dict[str, str]:
    out = {}
    for line in open(path):
        m = LINE.match(line)
        if m and "mutmut_" in m.group(1):
            out[m.group(1)] = m.group(2).strip()
    return out


def diff(scratch: str, name: str, mutmut: str) -> str:
    shown = subprocess.run([mutmut, "show", name], cwd=scratch, capture_output=True, text=True).stdout
    return "\n".join("      " + l for l in shown.splitlines() if l[:1] in "+-@" and not l.startswith(("---", "+++")))


def main(work: str, equivalent_file: str, min_score: float, seconds: int) -> int:
    equivalent = read_equivalent(equivalent_file)
    mutmut = os.path.join(os.path.dirname(sys.executable), "mutmut")
    total = killed = 0
    seen = set()
    rows, survivors, listed = [], [], []
    for scratch in sorted(d for d in os.listdir(work) if os.path.isfile(os.path.join(work, d, "results.txt"))):
        results = read_results(os.path.join(work, scratch, "results.txt"))
        n = k = eq = 0
        for name, status in sorted(results.items()):
            seen.add(name)
            if status in IGNORED:
                continue
            if status not in KILLED and name in equivalent:
                eq += 1
                listed.append(f"  {name}: {equivalent[name]}")
                continue
            n += 1
            if status in KILLED:
                k += 1
            else:
                survivors.append(f"  {name} ({status})\n{diff(os.path.join(work, scratch), name, mutmut)}")
        rows.append(f"  {scratch:32s} {k:4d} / {n:4d} killed  ({100.0 * k / max(n, 1):5.1f}%)  {eq} equivalent")
        total, killed = total + n, killed + k
    score = 100.0 * killed / max(total, 1)
    print("\nMutation score per module (equivalent mutants left out):")
    print("\n".join(rows))
    print(f"\nSurviving mutants ({len(survivors)}):")
    print("\n".join(survivors) or "  none")
    print(f"\nEquivalent mutants ({len(listed)}, from {os.path.basename(equivalent_file)}):")
    print("\n".join(listed) or "  none")
    modules = {name.rsplit(".", 1)[0] for name in seen}
    stale = sorted(n for n in set(equivalent) - seen if n.rsplit(".", 1)[0] in modules)
    if stale:
        print(f"\nListed as equivalent but not produced by these runs (renumbered or gone?): {', '.join(stale)}")
    print(f"\nKill rate: {killed} / {total} = {score:.1f}% (at least {min_score:g}% wanted), {seconds} s")
    return 0 if score >= min_score else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))

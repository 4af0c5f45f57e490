"""Per-module mutation scores from a finished ``mutmut run`` (reads ``mutants/*.meta``), with the survivors that
TESTING.md justifies as equivalent taken out of the denominator; a second score also leaves out those that are
equivalent on CPU only (device-only: they need a GPU test to be killed).

    mutmut run --max-children 2 && python benchmarks/mutation_scores.py [--markdown]

A survivor counts as justified only when TESTING.md has a table row whose first cell names it and whose verdict
starts with ``equivalent`` or ``device-only``; every other survivor, every mutant without a covering test and every
timeout-free "not checked" mutant is reported, so the score cannot look better than what was measured.

Mutants that mutmut did not kill (not run, survived, no test) but that were applied one at a time to a scratch copy
and run against named test files afterwards (most often after a test was added for them) are read from
``benchmarks/mutants_one_by_one.txt``: lines ``KILLED|SURVIVED|TIMEOUT <name>``, the last line of a name wins.
Such a mutant counts in the column ``killed one by one`` when that check killed it.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# mutmut's exit codes: 1 = a test failed (killed), 0 = all passed (survived), 33 = no test covers it,
# 36/-24/24 = timeout (counted as killed: the mutant made the tests hang), None = not run yet.
KILLED = {1, 3, 36, -24, 24, -9, -11, 137, 152}


def justified() -> dict[str, str]:
    """Survivors that TESTING.md justifies: mutant name -> 'equivalent' or 'device-only'."""
    out = {}
    for line in (ROOT / "TESTING.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (kind := re.match(r"(equivalent|device-only)", cells[-1])):
            for name in re.findall(r"`?(mobyssl\.[^`\s,]+__mutmut_\d+)`?", cells[0]):
                out[name] = kind.group(1)
    return out


def one_by_one() -> dict[str, str]:
    """The last recorded one-by-one result of each mutant: name -> KILLED, SURVIVED or TIMEOUT."""
    path = ROOT / "benchmarks" / "mutants_one_by_one.txt"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("KILLED", "SURVIVED", "TIMEOUT"):
                out[parts[1]] = parts[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--list", action="store_true", help="also list unjustified survivors and untested mutants")
    args = parser.parse_args()
    reasons = justified()
    checked = one_by_one()
    rows: dict[str, Counter] = defaultdict(Counter)
    open_: dict[str, list[str]] = defaultdict(list)
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        module = str(meta.relative_to(ROOT / "mutants"))[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            c = rows[module]
            c["mutants"] += 1
            if code in KILLED:
                c["killed"] += 1
            elif checked.get(name) == "KILLED":
                c["killed one by one"] += 1
            elif code is None and name not in checked:
                c["not run"] += 1
            elif code == 33 and name not in checked:
                c["no test"] += 1
                open_[module].append(name + " (no test)")
            elif name in reasons:
                c[reasons[name]] += 1
            else:
                c["survived"] += 1
                open_[module].append(name)
    cols = ["mutants", "killed", "killed one by one", "equivalent", "device-only", "survived", "no test", "not run"]
    header = ["module", *cols, "score", "score without device-only"]
    lines = []
    for module, c in rows.items():
        if not c["mutants"]:
            continue
        run = c["mutants"] - c["not run"]
        scores = []
        for relevant in (run - c["equivalent"], run - c["equivalent"] - c["device-only"]):
            score = f"{100 * (c['killed'] + c['killed one by one']) / relevant:.1f}%" if relevant else "-"
            scores.append(score if run == c["mutants"] else f"({score} so far)")
        lines.append([module, *(str(c[k]) for k in cols), *scores])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in lines:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
        for row in [header, *lines]:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if args.list:
        for module, names in open_.items():
            print(f"\n{module}:")
            for n in names:
                print("  " + n)


if __name__ == "__main__":
    main()

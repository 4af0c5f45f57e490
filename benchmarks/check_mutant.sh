#!/bin/bash
# One mutant, one at a time: apply mutmut's mutant NAME to a scratch copy of the package (never to this checkout),
# run the given pytest arguments there, print KILLED (a test failed), SURVIVED or TIMEOUT. Needs a `mutmut run`
# that generated the mutant (mutants/). Append the last line to benchmarks/mutants_one_by_one.txt to count it.
#
#   bash benchmarks/check_mutant.sh mobyssl.methods.dino.x_size_groups__mutmut_6 tests/methods/test_dino.py
#   CHECK_TIMEOUT=120 bash benchmarks/check_mutant.sh NAME tests/eval/test_linear_probe.py -k fast
set -u
name=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r "$root/mobyssl" "$root/tests" "$root/pyproject.toml" "$scratch"/
(cd "$root" && mutmut show "$name" 2>/dev/null) | sed -n '/^--- /,$p' > "$scratch/m.diff"
python - "$scratch" <<'PY' || { echo "APPLY FAILED $name"; exit 3; }
import sys
d = sys.argv[1]
lines = open(f"{d}/m.diff").read().splitlines()
if not lines:
    raise SystemExit("mutmut show printed no diff")
path = lines[0][4:].strip()
body = [l for l in lines[1:] if not l.startswith(("+++", "@@"))]
old = "\n".join(l[1:] for l in body if l[:1] in " -")
new = "\n".join(l[1:] for l in body if l[:1] in " +")
p = f"{d}/{path}"
src = open(p).read()
for indent in ("", "    ", "        "):  # mutmut shows methods dedented
    o = "\n".join(indent + l if l else l for l in old.split("\n"))
    n = "\n".join(indent + l if l else l for l in new.split("\n"))
    if src.count(o) == 1:
        open(p, "w").write(src.replace(o, n))
        break
else:
    raise SystemExit(f"hunk not found exactly once in {path} (the code changed since the mutant was made)")
PY
cd "$scratch" && PYTHONPATH="$scratch" OMP_NUM_THREADS=1 timeout "${CHECK_TIMEOUT:-900}" \
    python -m pytest -q -x -p no:cacheprovider "$@" > "$scratch/out.txt" 2>&1
rc=$?
grep -m2 "^FAILED\|^ERROR" "$scratch/out.txt"; tail -1 "$scratch/out.txt"
if [ $rc -eq 0 ]; then echo "SURVIVED $name"; elif [ $rc -eq 124 ]; then echo "TIMEOUT $name"; else echo "KILLED $name"; fi

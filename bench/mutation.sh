#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the code that guards .mask files: maskpack/storage/, io.py,
# masking.py and rehydrate.py, against the fast test files that cover them. Not part of CI.
#
# Usage:
#   bench/mutation.sh                      # every target file (about 16-35 min on 2 cores)
#   bench/mutation.sh maskpack/io.py       # one or more targets (glob patterns allowed)
#   JOBS=4 bench/mutation.sh               # parallel test processes (default 2)
#
# The run happens in a scratch copy ($MUTATION_DIR, default .mutation/ in the repository, ignored
# by git), so the working tree is never touched. Results: $MUTATION_DIR/mutants/ (mutmut's
# state; `cd $MUTATION_DIR && mutmut show NAME` prints a mutant's diff) and
# $MUTATION_DIR/results.txt (every mutant that was not killed); `python bench/mutation_report.py
# $MUTATION_DIR` prints the score per file and every survivor with its diff and reason. A second
# call reuses mutmut's cached verdicts for unchanged code and tests again every mutant not killed;
# delete $MUTATION_DIR to start over. Results of 2026-11-28: docs/results/mutation.md.
# Needs: pip install mutmut (3.x).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
MUTMUT=${MUTMUT:-$(dirname "$PY")/mutmut}
WORK=${MUTATION_DIR:-$ROOT/.mutation}
JOBS=${JOBS:-2}

TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(maskpack/storage/* maskpack/io.py maskpack/masking.py maskpack/rehydrate.py)
fi
# The fast tests that exercise those files (seconds each; no training runs).
TESTS=(tests/test_storage_container.py tests/test_storage_codecs.py tests/test_io.py
       tests/test_io_contracts.py tests/test_storage_contracts.py tests/test_rehydrate.py tests/test_masking.py
       tests/test_masking_fused.py tests/test_theorems.py tests/test_hostile.py
       tests/test_validation_rules.py tests/test_validation_rules_data.py tests/test_ans_counts.py
       tests/test_format_v1.py)
# Whole training runs (a minute each) that other tests in these files cover in pieces.
DESELECT=(tests/test_masking_fused.py::test_trainer_compile_option_trains_the_same_masks
          tests/test_masking_fused.py::test_compiled_channels_last_training_rehydrates_bit_identically)
if [ -n "${MUTATION_TESTS:-}" ]; then read -r -a TESTS <<< "$MUTATION_TESTS"; fi
PRESENT=()
for t in "${TESTS[@]}"; do [ -f "$ROOT/$t" ] && PRESENT+=("$t"); done
TESTS=("${PRESENT[@]}")

[ -x "$MUTMUT" ] || { echo "mutmut not found at $MUTMUT: pip install mutmut (or set MUTMUT=)" >&2; exit 1; }

mkdir -p "$WORK"
# Fresh sources and tests every call (mutmut re-tests only what changed).
rm -rf "$WORK/maskpack" "$WORK/tests"
cp -r "$ROOT/maskpack" "$WORK/maskpack"
mkdir -p "$WORK/tests"
cp "$ROOT/tests/conftest.py" "$ROOT/tests/mask_files.py" "${TESTS[@]/#/$ROOT/}" "$WORK/tests/"
cp -r "$ROOT/tests/data" "$WORK/tests/data"  # pinned files of format version 1
rm -rf "$WORK/bench" && mkdir -p "$WORK/bench"
cp "$ROOT"/bench/fuzz*.py "$WORK/bench/"  # tests/test_hostile.py runs the fuzz harness
find "$WORK/maskpack" -name __pycache__ -prune -exec rm -rf {} +
# pytest options (markers, filters) without any [tool.mutmut] table: the config is setup.cfg.
sed -n '/^\[tool.pytest.ini_options\]/,/^$/p' "$ROOT/pyproject.toml" > "$WORK/pyproject.toml"

{
    echo "[mutmut]"
    echo "source_paths = maskpack"
    echo "also_copy ="
    echo "    bench"
    echo "only_mutate ="
    printf '    %s\n' "${TARGETS[@]}"
    echo "pytest_add_cli_args_test_selection ="
    printf '    %s\n' "${TESTS[@]}"
    echo "pytest_add_cli_args ="
    echo "    -p"
    echo "    no:cacheprovider"
    echo "    -x"
    echo "    -q"
    for d in "${DESELECT[@]}"; do echo "    --deselect"; echo "    $d"; done
    # A mutant that makes a test loop (e.g. a varint reader that never ends) is stopped at
    # 3x the test's clean time + 5 s and counted as killed ("timeout").
    echo "timeout_multiplier = 3.0"
    echo "timeout_constant = 5.0"
} > "$WORK/setup.cfg"

cd "$WORK"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# mutmut puts mutants/ first on sys.path; PYTHONPATH must not point at another checkout.
unset PYTHONPATH
again=0
[ -d mutants ] && again=1
start=$(date +%s)
# New and changed mutants (all of them on a first run). mutmut keeps earlier verdicts as they are.
"$MUTMUT" run --max-children "$JOBS" | tr '\r' '\n' | tail -n 3
if [ "$again" = 1 ]; then
    # A later run: the tests may have changed, so test again every mutant not killed before.
    mapfile -t left < <("$MUTMUT" results | grep -E ': (survived|no tests|suspicious)$' | sed -E 's/^ *//; s/: .*$//')
    if [ ${#left[@]} -gt 0 ]; then
        echo "testing again ${#left[@]} mutants that were not killed"
        "$MUTMUT" run --max-children "$JOBS" "${left[@]}" | tr '\r' '\n' | tail -n 3
    fi
fi
end=$(date +%s)
"$MUTMUT" export-cicd-stats > /dev/null
"$MUTMUT" results > results.txt
"$PY" - "$end" "$start" <<'EOF'
import json, sys
from pathlib import Path

stats = json.loads(Path("mutants/mutmut-cicd-stats.json").read_text())
killed = stats.get("killed", 0) + stats.get("timeout", 0)
tested = killed + stats.get("survived", 0) + stats.get("no_tests", 0) + stats.get("suspicious", 0)
print(json.dumps(stats))
print(f"killed {killed} of {tested} ({100 * killed / max(tested, 1):.1f}%) in "
      f"{(int(sys.argv[1]) - int(sys.argv[2])) / 60:.1f} min; not killed: {Path('results.txt').resolve()}")
EOF

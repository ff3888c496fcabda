#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut: each module's mutants run against a fast
# subset of the tests (a few seconds per mutant), then the kill rate and the surviving mutants
# are printed; survivors listed in scripts/mutation_equivalent.txt (equivalent mutants: no test
# can tell them from the original) are reported apart and count as killed.
#
#   bash scripts/mutation.sh                 # every module of the table below
#   bash scripts/mutation.sh massl/optim.py  # only the modules named
#
# Needs the dev extras (pip install -e '.[dev]': mutmut). Not run in CI (it takes long, see
# README "Development"). Each module is mutated in a scratch copy of the repository under
# $MUTATION_DIR (default: a temporary folder, removed at the end); the working tree is never
# modified. Exit status: 0 if the kill rate is at least $MUTATION_MIN_SCORE percent (default 90).
set -euo pipefail

# module to mutate | the test files that exercise it (fast: no training run, no extra process)
TABLE="
massl/loss.py                 | tests/test_loss.py
massl/memory.py               | tests/test_memory_shards.py tests/test_memory.py::test_fifo_order_and_wraparound tests/test_memory.py::test_initial_memory_is_unit_norm_and_seeded tests/test_memory.py::test_state_roundtrip
massl/schedules.py            | tests/test_schedules.py
massl/objective.py            | tests/test_objective.py
massl/optim.py                | tests/test_optim.py
massl/checkpoint/manager.py   | tests/test_checkpoint_manager.py
massl/checkpoint/resume.py    | tests/test_resume_start.py
massl/data/epoch_plan.py      | tests/test_epoch_orders.py
"

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
MUTMUT="$(dirname "$PYTHON")/mutmut"
[ -x "$MUTMUT" ] || MUTMUT="$(command -v mutmut || true)"
if [ -z "$MUTMUT" ]; then
    echo "error: mutmut is not installed; install the dev extras: .venv/bin/python -m pip install -e '.[dev]'" >&2
    exit 2
fi
EQUIVALENT="$REPO/scripts/mutation_equivalent.txt"
MIN_SCORE="${MUTATION_MIN_SCORE:-90}"
WORK="${MUTATION_DIR:-}"
if [ -z "$WORK" ]; then
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi

selected=("$@")
rows=()
while IFS='|' read -r module tests; do
    module="$(echo "$module" | xargs)"; tests="$(echo "$tests" | xargs)"
    [ -n "$module" ] || continue
    if [ ${#selected[@]} -gt 0 ] && [[ ! " ${selected[*]} " == *" $module "* ]]; then continue; fi
    if [ ! -f "$REPO/$module" ]; then echo "skipping $module (not in this version)"; continue; fi
    rows+=("$module|$tests")
done <<< "$TABLE"
if [ ${#rows[@]} -eq 0 ]; then
    echo "error: no module of the table matches: ${selected[*]}" >&2
    exit 2
fi

start=$SECONDS
for row in "${rows[@]}"; do
    module="${row%%|*}"; tests="${row#*|}"
    scratch="$WORK/$(echo "$module" | tr '/.' '__')"
    rm -rf "$scratch" && mkdir -p "$scratch"
    # the repository's files as they are now (committed or not), without venvs and caches
    (cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$scratch")
    {
        echo "[mutmut]"
        echo "source_paths = massl"
        echo "only_mutate = $module"
        echo "also_copy ="; echo "    configs"; echo "    pytest.ini"
        echo "pytest_add_cli_args_test_selection ="
        for t in $tests; do echo "    $t"; done
        echo "pytest_add_cli_args ="; echo "    -p"; echo "    no:cacheprovider"
        echo "process_isolation = forkserver"
        echo "use_git_change_detection = false"
    } > "$scratch/setup.cfg"
    echo "== $module against $tests"
    t0=$SECONDS
    (cd "$scratch" && "$MUTMUT" run > run.log 2>&1) || { echo "error: mutmut failed on $module:"; tail -30 "$scratch/run.log"; exit 1; }
    (cd "$scratch" && "$MUTMUT" results --all true > results.txt 2>&1)
    echo "   $(( SECONDS - t0 )) s"
    cp "$scratch/results.txt" "$WORK/results_$(basename "$scratch").txt"
done

"$PYTHON" "$REPO/scripts/mutation_report.py" "$WORK" "$EQUIVALENT" "$MIN_SCORE" "$(( SECONDS - start ))"

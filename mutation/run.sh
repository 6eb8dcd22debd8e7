#!/usr/bin/env bash
# Mutation testing of one module (issue 24): mutation/run.sh MODULE [COMMIT]
#   needs cosmic-ray in the venv: .venv/bin/pip install -e ".[mutation]"
#   MODULE is a config beside this script (rl_math, rewards, ppo_trainer, online_dpo, own_loop);
#   COMMIT defaults to HEAD. cosmic-ray rewrites the module in place while it runs each mutant's tests,
#   so the run happens in a throwaway git worktree of COMMIT ($MUTATION_ROOT/worktree-MODULE), never in
#   the working tree. The session database and the log land in $MUTATION_ROOT (default /tmp/mutation);
#   mutation/summarize.py turns sessions into the tables of benchmarks/results/mutation.md.
# Re-running with the same session keeps finished results and runs only the pending mutants; set
# RERUN_SURVIVORS=1 to run the survivors again (after adding tests).
set -euo pipefail
module=$1
here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
commit=$(git -C "$repo" rev-parse "${2:-HEAD}")
python=${PYTHON:-$repo/.venv/bin/python}
bin=$(dirname "$python")
export PATH="$bin:$PATH"   # the configs run "python -m pytest"
root=${MUTATION_ROOT:-/tmp/mutation}
config=$here/$module.toml
session=$root/$module.sqlite
worktree=$root/worktree-$module
mkdir -p "$root"

if [ -d "$worktree" ]; then
    git -C "$worktree" checkout --quiet --detach "$commit"
else
    git -C "$repo" worktree add --quiet --detach "$worktree" "$commit"
fi
cd "$worktree"
echo "== $module at $(git rev-parse --short HEAD), $(date -u +%FT%TZ)"

if [ ! -f "$session" ]; then
    "$bin/cosmic-ray" init "$config" "$session"
    "$bin/cr-filter-operators" "$session" "$config"
    "$python" "$here/focus_filter.py" "$session" "$config"
elif [ "${RERUN_SURVIVORS:-0}" = 1 ]; then
    "$python" "$here/summarize.py" --forget-survivors "$session"
fi
"$bin/cosmic-ray" baseline "$config"   # the unmutated tests must pass, else every mutant looks killed
"$bin/cosmic-ray" exec "$config" "$session"
"$python" "$here/summarize.py" "$session"
echo "== done $(date -u +%FT%TZ)"

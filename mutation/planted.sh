#!/usr/bin/env bash
# The two mutations issue 24 planted by hand, each applied alone to a throwaway worktree of COMMIT and run
# against the tests that must catch it: mutation/planted.sh [COMMIT]  (prints each test's pass/fail)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
commit=$(git -C "$repo" rev-parse "${1:-HEAD}")
python=${PYTHON:-$repo/.venv/bin/python}
worktree=${MUTATION_ROOT:-/tmp/mutation}/planted
[ -d "$worktree" ] || git -C "$repo" worktree add --quiet --detach "$worktree" "$commit"
cd "$worktree" && git checkout --quiet --detach "$commit" && git checkout --quiet -- .
echo "== planted mutations at $(git rev-parse --short HEAD)"

plant() {  # plant NAME FILE OLD NEW TEST_ARGS...
    local name=$1 file=$2 old=$3 new=$4; shift 4
    grep -qF -- "$old" "$file" || { echo "!! $name: line not found in $file"; return 1; }
    OLD=$old NEW=$new "$python" -c 'import os,sys; p=sys.argv[1]; s=open(p).read(); open(p,"w").write(s.replace(os.environ["OLD"], os.environ["NEW"], 1))' "$file"
    echo "-- $name: $(git diff --unified=0 -- "$file" | grep '^[-+][^-+]' | tr '\n' ' ')"
    "$python" -m pytest -q -p no:cacheprovider -rA "$@" 2>&1 | grep -E '^(PASSED|FAILED|ERROR) |passed|failed'
    git checkout --quiet -- "$file"
}

# 1. PPO's log-probs without "/ temperature" (own_loop.answer_logits, which PPO uses for policy and reference)
plant "log-probs without / temperature" alignment_pipelines/methods/own_loop.py \
    'context_length - 1:-1].float() / temperature' 'context_length - 1:-1].float()' \
    tests/test_ppo_trainer.py tests/test_learning_signal.py -k "temperature or raises_a_rule_reward"
# 2. online DPO with chosen and rejected swapped: each pair trained towards the answer the annotator rejected
plant "online DPO chosen/rejected swapped" alignment_pipelines/methods/online_dpo.py \
    'losses = batch.labels * a_wins + (1 - batch.labels) * b_wins' \
    'losses = batch.labels * b_wins + (1 - batch.labels) * a_wins' \
    tests/test_online_dpo.py tests/test_learning_signal.py -k "shorter or step_size or ties_are or online_dpo_"

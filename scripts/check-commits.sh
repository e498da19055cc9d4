#!/usr/bin/env bash
# Checks the subjects of the commits in a range (default main..HEAD): at most 72 characters,
# starting with the area they change, as in "sessions: split the copier out",
# "units, config: exact sizes" or "save area: ...". Merge commits are not checked. Exit 1 if any subject fails.
#   scripts/check-commits.sh [RANGE]      e.g. origin/main..HEAD, HEAD~3.., a1b2c3d..e4f5a6b
set -euo pipefail
range=${1:-main..HEAD}
max=72
area='[A-Za-z0-9_.][A-Za-z0-9_./-]*( [A-Za-z0-9_./-]+)?'  # a module, a path, or two words: "save area"
prefix="^${area}(, ${area})*: [^ ]"

commits=$(git rev-list --no-merges "$range") || { echo "check-commits: bad range '$range'" >&2; exit 2; }
bad=0
count=0
for c in $commits; do
    count=$((count + 1))
    subject=$(git log -1 --format=%s "$c")
    short=$(git rev-parse --short "$c")
    problems=()
    n=${#subject}
    ((n <= max)) || problems+=("subject is $n characters (at most $max)")
    [[ $subject =~ $prefix ]] || problems+=("subject does not start with its area ('area: what it does')")
    if ((${#problems[@]})); then
        bad=$((bad + 1))
        for p in "${problems[@]}"; do
            echo "$short $p: $subject"
        done
    fi
done
if ((bad)); then
    echo "check-commits: $bad of $count commits in $range need a new subject (git rebase -i to reword)" >&2
    exit 1
fi
echo "check-commits: $count commits in $range, subjects fine"

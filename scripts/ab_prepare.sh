#!/usr/bin/env bash
# Variants of the package for an A/B call on a GPU host (scripts/ab_run.sh), prepared on a
# machine with the git history (the GPU host gets a copy of the working tree, no history).
#
#   scripts/ab_prepare.sh NAME=SOURCE [NAME=SOURCE ...]      (from the repository root)
#
# SOURCE is a git revision (branch, tag or commit) or a patch file (*.patch or *.diff,
# applied with `git apply` onto main). Each variant's deformops/, scripts/ and tests/
# folders and its pyproject.toml (pytest's settings, so that its tests run as in the
# repository) go to .peer/v/NAME, which git ignores: name .peer in the device call's carry.
# The working tree itself is the variant `tree` of scripts/ab_run.sh (no need to prepare
# it). Exit status: 0 when every variant was prepared.
set -euo pipefail

(($#)) || { echo "usage: scripts/ab_prepare.sh NAME=SOURCE [NAME=SOURCE ...]" >&2; exit 2; }
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
PARTS=(deformops scripts tests pyproject.toml)

for spec in "$@"; do
    name=${spec%%=*}
    source=${spec#*=}
    if [[ $spec != *=* || -z $name || -z $source || ! $name =~ ^[A-Za-z0-9_-]+$ || $name == tree ]]; then
        echo "ab_prepare: bad variant '$spec': NAME=SOURCE, NAME of letters, digits, '_' and '-', not 'tree'" >&2
        exit 2
    fi
    dest=.peer/v/$name
    rm -rf "$dest"
    mkdir -p "$dest"
    if [[ $source == *.patch || $source == *.diff ]]; then
        [[ -f $source ]] || { echo "ab_prepare: $name: no patch file $source" >&2; exit 1; }
        work=$(mktemp -d)
        git archive main | tar -x -C "$work"
        git -C "$work" init -q
        git -C "$work" apply --whitespace=nowarn "$ROOT/$source"
        (cd "$work" && tar -c "${PARTS[@]}") | tar -x -C "$dest"
        rm -rf "$work"
        echo "$name: main with $source applied -> $dest"
    else
        git rev-parse --verify --quiet "$source^{commit}" >/dev/null ||
            { echo "ab_prepare: $name: no revision $source" >&2; exit 1; }
        git archive "$source" "${PARTS[@]}" | tar -x -C "$dest"
        echo "$name: $(git log -1 --format='%h %s' "$source" | cut -c1-80) -> $dest"
    fi
done

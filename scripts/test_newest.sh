#!/usr/bin/env bash
# Runs the export/decode/resume parity tests (marker `parity`) in a second virtualenv, .venv-newest,
# resolved from pyproject.toml alone rather than requirements.txt: pip takes the newest transformers,
# peft, datasets and deepspeed that the declared ranges allow, which is what a user's `pip install`
# gets. A release inside the declared ranges that breaks decoding or resume fails here.
# Then, for each of those capped packages, it tries the newest registry release ABOVE its cap in a third
# virtualenv and prints one line per package: "<pkg> <version>: passes: the cap can move" or the tests
# that fail. Those lines only inform: the exit status is the in-cap run's. A package with no release
# above its cap costs one registry query. LINEARIZE_ABOVE_CAP=0 skips the above-cap part.
# Arguments go to pytest (both runs).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LINEARIZE_NEWEST_VENV:-.venv-newest}
# Outside the tree (it is not git-ignored there); pip re-syncs it on every use, so reusing it is safe.
above_venv=${LINEARIZE_ABOVE_VENV:-${TMPDIR:-/tmp}/linearize-above-cap}
capped=(transformers peft datasets deepspeed)
extras=test,deepspeed,triton
marker="parity and not slow and not gpu"
# The stamp names the pyproject hash: editing the ranges re-resolves. Delete the virtualenv to pick up
# releases published since it was made (CI starts from a fresh clone, so it always resolves anew).
stamp="$venv/.deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # torch is pinned in the same command, or pip pulls a multi-GB CUDA build; eager upgrades move an
  # existing virtualenv to the newest releases the new ranges allow.
  "$venv/bin/pip" install -q --upgrade --upgrade-strategy eager torch==2.13.0 -e ".[$extras]"
  rm -f "$venv"/.deps-*
  touch "$stamp"
fi

show_versions() {
  "$1/bin/python" - "$2" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


names = ["torch", "transformers", "peft", "datasets", "deepspeed", "triton", "accelerate", "safetensors",
         "tokenizers", "huggingface-hub"]
print(sys.argv[1] + ": " + ", ".join(f"{n} {installed(n)}" for n in names))
PY
}

show_versions "$venv" "newest allowed by pyproject.toml"
# The command-line -m replaces the one in pyproject's addopts, so the slow and gpu tiers stay excluded here.
set +e
"$venv/bin/python" -m pytest -q -m "$marker" "$@"
in_cap=$?
set -e
[ "${LINEARIZE_ABOVE_CAP:-1}" = 0 ] && exit "$in_cap"

# Prints "<pkg> <version> <requirements file>" for each capped package with a release above its cap,
# and a line starting with "#" for each without one. The requirement set is linearize's own (read from
# its installed metadata, so it is pyproject's), with that one package pinned to the release above.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plan() {
  "$venv/bin/python" - "$work" "$extras" "${capped[@]}" <<'PY'
import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

work, extras, names = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]


def wanted(req: Requirement) -> bool:
    """Core requirements and those of the extras the parity tests run with."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras)


reqs = [req for req in map(Requirement, requires("linearize") or []) if wanted(req)]
by_name = {canonicalize_name(req.name): req for req in reqs}


def releases(name: str) -> list[Version]:
    """Final releases on the registry (pre-releases are not what `pip install` picks)."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                         capture_output=True, text=True).stdout
    match = re.search(r"Available versions: (.*)", out)
    found = []
    for text in (match.group(1).split(", ") if match else []):
        try:
            found.append(Version(text))
        except InvalidVersion:
            continue
    return [v for v in found if not v.is_prerelease]


for name in names:
    req = by_name[canonicalize_name(name)]
    found = releases(name)
    if not found:
        print(f"# {name}: the registry did not answer `pip index versions`; nothing tried above {req.specifier}")
        continue
    inside = [v for v in found if req.specifier.contains(v)]
    above = [v for v in found if not req.specifier.contains(v) and (not inside or v > max(inside))]
    if not above:
        newest = max(inside) if inside else max(found)
        print(f"# {name} {newest}: the newest release is inside the cap {req.specifier}; nothing above to try")
        continue
    newest = max(above)
    lines = [str(r) for r in reqs if canonicalize_name(r.name) != canonicalize_name(name)]
    # Markers are dropped: the extras were already chosen above.
    lines = [line.split(";")[0].strip() for line in lines] + [f"{name}=={newest}"]
    path = work / f"above-{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    print(f"{name} {newest} {path}")
PY
}

summary=()
mapfile -t planned < <(plan)
for line in "${planned[@]}"; do
  if [ "${line:0:1}" = "#" ]; then summary+=("${line:2}"); continue; fi
  read -r pkg version reqfile <<<"$line"
  echo "above the cap: $pkg $version in $above_venv"
  [ -x "$above_venv/bin/python" ] || python3 -m venv "$above_venv"
  log="$work/$pkg.log"
  # Eager upgrades give the newest release the other ranges allow, as in .venv-newest; torch is pinned
  # in the same command (CUDA build otherwise). linearize goes in without deps: its metadata excludes
  # the release being tried.
  if ! "$above_venv/bin/pip" install -q --upgrade --upgrade-strategy eager torch==2.13.0 -r "$reqfile" \
      >"$log" 2>&1 || ! "$above_venv/bin/pip" install -q --no-deps -e . >>"$log" 2>&1; then
    summary+=("$pkg $version: does not install beside the other ranges: $(grep -m1 -i error "$log" || tail -1 "$log")")
    continue
  fi
  show_versions "$above_venv" "  tried with"
  set +e
  "$above_venv/bin/python" -m pytest -q -rfE -m "$marker" "$@" >"$log" 2>&1
  rc=$?
  set -e
  tail -1 "$log"
  if [ "$rc" = 0 ]; then
    summary+=("$pkg $version: passes: the cap can move")
  else
    failed=$(grep -E '^(FAILED|ERROR) ' "$log" | cut -d' ' -f2 | sort -u | tr '\n' ' ')
    summary+=("$pkg $version: fails (pytest exit $rc): ${failed:-$(tail -1 "$log")}")
  fi
done

echo "releases above the caps (informational; CI fails only on the in-cap run above):"
printf '  %s\n' "${summary[@]}"
exit "$in_cap"

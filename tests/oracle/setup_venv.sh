#!/usr/bin/env bash
# Create (once) the private virtualenv holding the real Neutron used as the parity oracle, and
# print its python's path on stdout.
#
# Location: ${SG_ORACLE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sg/oracle-venv}, outside the work
# tree, so that `cargo clean`, every work tree and every fresh clone on the machine (CI runs in
# a fresh clone on the developer's machine) share one install instead of paying ~100 s each.
#
# Idempotent: the stamp file holds the sha256 of requirements.txt; when it matches and the
# venv's python still runs, this is a no-op (~30 ms). Otherwise the venv is rebuilt from
# scratch. flock serialises concurrent callers (parallel tests, several work trees).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
req="$here/requirements.txt"
venv=${SG_ORACLE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sg/oracle-venv}
python=${SG_ORACLE_PYTHON:-python3}
stamp="$venv/.sg-oracle-stamp"
want=$(sha256sum "$req" | cut -d' ' -f1)

ready() {
  [[ -f $stamp && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c '' 2>/dev/null
}

if ready; then
  echo "$venv/bin/python"
  exit 0
fi

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if ready; then # another caller finished the install while we waited
  echo "$venv/bin/python"
  exit 0
fi

start=$(date +%s)
echo "oracle venv: installing $(grep "^neutron==" "$req") and its pinned dependencies into $venv" >&2
rm -rf "$venv"
if ! "$python" -m venv "$venv" >&2; then
  echo "oracle venv: '$python -m venv' failed (on Debian: apt-get install python3-venv)" >&2
  exit 1
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req" >&2
# Smoke test: the driver imports.
"$venv/bin/python" -W ignore -c 'import neutron.agent.linux.iptables_firewall' >&2
echo "$want" >"$stamp"
echo "oracle venv: installed in $(($(date +%s) - start))s" >&2
echo "$venv/bin/python"

#!/usr/bin/env bash
# Create (once) the private virtualenv holding the real Neutron used as the parity oracle.
#
#   tests/oracle/setup_venv.sh          -> prints the venv's python path on stdout
#
# Location: ${SG_ORACLE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sg/oracle-venv}.
# It lives outside the work tree so that `cargo clean`, a fresh clone and CI (which runs in a
# fresh clone on the same machine) all reuse one install per machine. A stamp file records the
# sha256 of requirements.txt and the interpreter version; when both match this script is a
# no-op (a few ms). Otherwise the venv is rebuilt from scratch. flock serialises concurrent
# callers (several work trees and CI share the machine).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
req="$here/requirements.txt"
venv=${SG_ORACLE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sg/oracle-venv}
python=${SG_ORACLE_PYTHON:-python3}

want="$(sha256sum "$req" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
stamp="$venv/.sg-oracle-stamp"

if [[ -f $stamp && "$(cat "$stamp")" == "$want" && -x $venv/bin/python ]]; then
  echo "$venv/bin/python"
  exit 0
fi

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
# Re-check under the lock: another caller may have finished the install meanwhile.
if [[ -f $stamp && "$(cat "$stamp")" == "$want" && -x $venv/bin/python ]]; then
  echo "$venv/bin/python"
  exit 0
fi

start=$(date +%s)
echo "oracle venv: installing into $venv" >&2
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  -r "$req" >&2
# Smoke test: the driver module imports.
"$venv/bin/python" -W ignore -c 'import neutron.agent.linux.iptables_firewall' >&2
echo "$want" >"$stamp"
echo "oracle venv: installed in $(( $(date +%s) - start ))s" >&2
echo "$venv/bin/python"

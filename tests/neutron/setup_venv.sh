#!/usr/bin/env bash
# Create (once) the virtualenv of `cargo xtask neutron`: neutron 29.0.0 with the test
# dependencies of its functional suite, and print its python's path on stdout.
#
# The same pattern as tests/oracle/setup_venv.sh: the venv lives outside the work tree
# (${SG_NEUTRON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sg/neutron-venv}) so that every work tree
# and fresh clone on the machine shares one install; a stamp holds the sha256 of both
# requirement files; flock serialises concurrent callers. The sg_neutron package is NOT
# installed here: each run installs the work tree's copy into a directory of its own
# (xtask neutron), so that two work trees never see each other's driver.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${SG_NEUTRON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sg/neutron-venv}
python=${SG_NEUTRON_PYTHON:-python3}
stamp="$venv/.sg-neutron-stamp"
want=$(cat "$here/requirements.txt" "$here/../oracle/requirements.txt" | sha256sum | cut -d' ' -f1)

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
echo "neutron venv: installing neutron 29.0.0 and the functional-test dependencies into $venv" >&2
rm -rf "$venv"
if ! "$python" -m venv "$venv" >&2; then
  echo "neutron venv: '$python -m venv' failed (on Debian: apt-get install python3-venv)" >&2
  exit 1
fi
(cd "$here" && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  -r requirements.txt) >&2
# Smoke test: the functional firewall test imports.
"$venv/bin/python" -W ignore -c 'import neutron.tests.functional.agent.test_firewall' >&2
echo "$want" >"$stamp"
echo "neutron venv: installed in $(($(date +%s) - start))s" >&2
echo "$venv/bin/python"

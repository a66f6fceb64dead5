#!/usr/bin/env python3
"""Kernel check: load the oracle's output into fresh network namespaces.

For every corpus file and option variant, and for both iptables back ends (nft and
legacy), in a new namespace `sgor-<pid>-<n>`:
  1. run the output's `# ipset` section (creates the sets inside the namespace),
  2. `iptables-restore --test` / `ip6tables-restore --test` the IPv4 / IPv6 sections,
  3. restore them for real, read `iptables-save` / `ip6tables-save` back and compare
     with the oracle's text chain by chain, collecting the kernel's canonicalisations.
Namespaces are deleted in every case (finally + SIGINT/SIGTERM). The host's own ruleset
is never touched. Needs root.

  tests/oracle/kernel_check.py [--backend nft|legacy|both] [--json REPORT] [FILE...]
(default: every tests/corpus/*.json and sg-user/examples/*.json; a FILE holding a JSON list is a batch of
{"name", "input"} cases as printed by `sg-gen --batch`; exit status 1 if anything
fails to load)
"""

import argparse
import difflib
import json
import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, '..', 'corpus')
EXAMPLES = os.path.join(HERE, '..', '..', 'sg-user', 'examples')  # WEB1
ORACLE = os.path.join(HERE, 'oracle')
VARIANTS = {
    'lb': ['--agent', 'linuxbridge'],
    'lb-no-comments': ['--agent', 'linuxbridge', '--no-comments'],
    'lb-no-ipset': ['--agent', 'linuxbridge', '--no-ipset'],
    'hybrid': ['--agent', 'ovs-hybrid'],
}
TOOLS = {
    'nft': ('iptables-nft-restore', 'ip6tables-nft-restore',
            'iptables-nft-save', 'ip6tables-nft-save'),
    'legacy': ('iptables-legacy-restore', 'ip6tables-legacy-restore',
               'iptables-legacy-save', 'ip6tables-legacy-save'),
}

_namespaces = []
_counter = [0]


def _cleanup(*_):
    while _namespaces:
        subprocess.run(['ip', 'netns', 'delete', _namespaces.pop()],
                       stderr=subprocess.DEVNULL)


def _on_signal(signum, _frame):
    _cleanup()
    sys.exit(128 + signum)


def sections(text):
    """Split oracle output into {'4': text, '6': text, 'ipset': text}."""
    out, cur = {}, None
    for line in text.split('\n'):
        m = {'# IPv4': '4', '# IPv6': '6', '# ipset': 'ipset'}.get(line)
        if m:
            cur = m
            out[cur] = []
        elif cur:
            out[cur].append(line)
    return {k: '\n'.join(v).strip('\n') + '\n' for k, v in out.items()}


def parse_save(text):
    """iptables-save text -> {table: {'chains': [...], 'rules': [...]}}."""
    tables, cur = {}, None
    for line in text.split('\n'):
        if not line or line.startswith('#'):
            continue
        if line.startswith('*'):
            cur = tables.setdefault(line[1:], {'chains': [], 'rules': []})
        elif line == 'COMMIT':
            cur = None
        elif line.startswith(':'):
            cur['chains'].append(line.split(' ')[0][1:])
        else:
            cur['rules'].append(line)
    return tables


def canon_pattern(ours, theirs):
    """Name the kernel's rewrite of one rule (one category per token change)."""
    a, b = ours.split(' '), theirs.split(' ')
    cats = set()
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == 'equal':
            continue
        old, new = a[i1:i2], b[j1:j2]
        if op == 'replace' and len(old) == len(new):
            for x, y in zip(old, new):
                if x.lower() == y:
                    cats.add('MAC printed in lower case')
                elif '/' in x and '/' in y and x.split('/')[1] == y.split('/')[1]:
                    cats.add('host bits of a prefix cleared')
                elif y == 'any' and x.startswith('255'):
                    cats.add('ICMP type 255 printed as "any" (matches every type)')
                else:
                    cats.add('other: %s -> %s' % (x, y))
        elif not new and len(old) == 2 and old[0] in ('-s', '-d') and \
                old[1].endswith('/0'):
            cats.add('%s %s omitted' % (old[0], old[1]))
        elif not new and len(old) == 2 and old[0] == '-p' and \
                old[1] in ('ip', 'hopopt', '0'):
            cats.add('-p %s (protocol 0) omitted' % old[1])
        else:
            cats.add('other: %r -> %r' % (' '.join(old), ' '.join(new)))
    return '; '.join(sorted(cats))


def compare(oracle_text, kernel_text):
    """Differences table by table; rules compared in order within a chain."""
    want, got = parse_save(oracle_text), parse_save(kernel_text)
    diffs = []
    for table, w in want.items():
        g = got.get(table, {'chains': [], 'rules': []})
        if sorted(w['chains']) != sorted(g['chains']):
            diffs.append(('chains', table, str(w['chains']), str(g['chains'])))
        if w['chains'] != g['chains'] and sorted(w['chains']) == sorted(
                g['chains']):
            diffs.append(('chain order', table, str(w['chains']),
                          str(g['chains'])))
        if len(w['rules']) != len(g['rules']):
            diffs.append(('rule count', table, str(len(w['rules'])),
                          str(len(g['rules']))))
            sw, sg = set(w['rules']), set(g['rules'])
            for r in w['rules']:
                if r not in sg:
                    diffs.append(('missing', table, r, ''))
            for r in g['rules']:
                if r not in sw:
                    diffs.append(('extra', table, '', r))
        else:
            for a, b in zip(w['rules'], g['rules']):
                if a != b:
                    diffs.append(('rule', table, a, b))
    return diffs


def run(cmd, ns=None, stdin=None):
    if ns:
        cmd = ['ip', 'netns', 'exec', ns] + cmd
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True)


def check_one(text, backend):
    """Returns (ok, stage_errors, diffs)."""
    restore4, restore6, save4, save6 = TOOLS[backend]
    _counter[0] += 1
    ns = 'sgor-%d-%d' % (os.getpid(), _counter[0])
    r = subprocess.run(['ip', 'netns', 'add', ns], capture_output=True,
                       text=True)
    if r.returncode:
        return False, ['ip netns add: ' + r.stderr.strip()], []
    _namespaces.append(ns)
    errors, diffs = [], []
    try:
        sec = sections(text)
        r = run(['bash', '-e', '-s'], ns, sec.get('ipset', ''))
        if r.returncode:
            errors.append('ipset: ' + r.stderr.strip())
        for fam, restore, save in (('4', restore4, save4),
                                   ('6', restore6, save6)):
            # -w: iptables-legacy's xtables lock is one for all namespaces; wait for it
            # rather than fail when another test on the host holds it.
            r = run([restore, '-w', '10', '--test'], ns, sec[fam])
            if r.returncode:
                errors.append('%s --test: %s' % (restore, r.stderr.strip()))
                continue
            r = run([restore, '-w', '10'], ns, sec[fam])
            if r.returncode:
                errors.append('%s: %s' % (restore, r.stderr.strip()))
                continue
            r = run([save], ns)
            if r.returncode:
                errors.append('%s: %s' % (save, r.stderr.strip()))
                continue
            diffs += [(fam,) + d for d in compare(sec[fam], r.stdout)]
    finally:
        _namespaces.remove(ns)
        subprocess.run(['ip', 'netns', 'delete', ns],
                       stderr=subprocess.DEVNULL)
    return not errors, errors, diffs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('files', nargs='*')
    ap.add_argument('--backend', choices=['nft', 'legacy', 'both'],
                    default='both')
    ap.add_argument('--host', default='compute-1')
    ap.add_argument('--json', help='write the full report here')
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit('kernel_check.py needs root (network namespaces)')
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    files = args.files or sorted(
        os.path.join(d, f) for d in (CORPUS, EXAMPLES) for f in os.listdir(d)
        if f.endswith('.json'))
    batch = []
    for f in files:
        with open(f) as fh:
            doc = json.load(fh)
        if isinstance(doc, list):  # a batch: [{"name", "input"}] (sg-gen --batch)
            batch += [{'name': c['name'], 'input': c['input']} for c in doc]
        else:
            batch.append({'name': os.path.basename(f)[:-5], 'input': doc})
    backends = ['nft', 'legacy'] if args.backend == 'both' else [args.backend]

    report, failures, patterns = [], 0, {}
    try:
        for variant, opts in VARIANTS.items():
            r = subprocess.run([ORACLE, '--batch', '--host', args.host] + opts
                               + ['-'], input=json.dumps(batch),
                               capture_output=True, text=True)
            if r.returncode:
                sys.exit('oracle failed: %s' % r.stderr[-2000:])
            for res in json.loads(r.stdout):
                if 'output' not in res:
                    failures += 1
                    print('FAIL %s/%s: oracle: %s' % (
                        res['name'], variant,
                        res.get('error') or res.get('crash')))
                    continue
                for backend in backends:
                    ok, errors, diffs = check_one(res['output'], backend)
                    report.append({'name': res['name'], 'variant': variant,
                                   'backend': backend, 'loaded': ok,
                                   'errors': errors,
                                   'differences': diffs})
                    if not ok:
                        failures += 1
                    for d in diffs:
                        key = (backend, d[1], canon_pattern(d[3], d[4])
                               if d[1] == 'rule' else d[1])
                        patterns.setdefault(key, []).append(
                            '%s/%s v%s %s' % (res['name'], variant, d[0],
                                              d[2]))
                    print('%s %-16s %-15s %-6s %d difference(s)%s' % (
                        'ok  ' if ok else 'FAIL', res['name'], variant,
                        backend, len(diffs),
                        '' if ok else ': ' + ' | '.join(errors)))
    finally:
        _cleanup()

    print('\nKernel canonicalisations (oracle text -> %s-save text):'
          % '/'.join(backends))
    for (backend, kind, pat), where in sorted(patterns.items()):
        print('  [%s] %s %s  (%d rules, e.g. %s)' % (
            backend, kind, pat, len(where), where[0]))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'results': report,
                       'patterns': [{'backend': b, 'kind': k, 'pattern': p,
                                     'count': len(w), 'examples': w[:5]}
                                    for (b, k, p), w in sorted(
                                        patterns.items())]}, f, indent=1)
    n = len(report)
    print('\n%d loaded, %d failed' % (n - failures, failures))
    sys.exit(1 if failures else 0)


if __name__ == '__main__':
    main()

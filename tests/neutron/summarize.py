#!/usr/bin/env python3
"""Summarise a subunit v2 stream of Neutron's functional firewall test.

Usage: summarize.py DRIVER SECONDS < stream.subunit

Prints every failure with its traceback, every skip with its reason, the test list with
its outcome, then the line `neutron test_firewall (DRIVER): N passed, N failed, N skipped`.
Exits 1 if a test failed or errored, or if the stream holds no test at all.
"""
import sys

import subunit
import testtools


def main():
    driver, seconds = sys.argv[1], float(sys.argv[2])
    results = {}

    def on_test(test):
        results[test['id']] = test

    stream = subunit.ByteStreamToStreamResult(sys.stdin.buffer,
                                              non_subunit_name='stdout')
    result = testtools.StreamToDict(on_test)
    result.startTestRun()
    try:
        stream.run(result)
    finally:
        result.stopTestRun()

    counts = {'success': 0, 'fail': 0, 'skip': 0}
    for tid in sorted(results):
        t = results[tid]
        status = t['status']
        if status in ('fail', 'uxsuccess'):
            key = 'fail'
        elif status == 'skip':
            key = 'skip'
        elif status in ('success', 'xfail'):
            key = 'success'
        else:  # 'exists', 'inprogress': a test that never finished
            key = 'fail'
        counts[key] += 1
        name = tid.split('.')[-1]
        if key == 'skip':
            reason = t['details'].get('reason')
            text = reason.as_text().strip() if reason else '(no reason given)'
            print('SKIP  %s: %s' % (name, text))
        elif key == 'fail':
            print('FAIL  %s' % name)
            for dname, detail in t['details'].items():
                if dname in ('traceback', 'reason'):
                    print('      ' + detail.as_text().replace('\n', '\n      '))
        else:
            print('ok    %s' % name)
    total = sum(counts.values())
    print('neutron test_firewall (%s): %d passed, %d failed, %d skipped '
          'in %.0f s' % (driver, counts['success'], counts['fail'],
                         counts['skip'], seconds))
    return 1 if counts['fail'] or total == 0 else 0


if __name__ == '__main__':
    sys.exit(main())

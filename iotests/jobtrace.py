"""Side-by-side transcripts of block-job scenarios for iotests (blockd vs qemu-storage-daemon).

A scenario is a function of a `Transcript`; it runs once against QSD and once against blockd.
`Transcript` records requests, replies and events in arrival order; `print_side_by_side` prints
blockd's transcript and, where QSD's differs, QSD's lines as "QSD DIFFERS: ...".
"""

import difflib
import json
import os
import re
import subprocess

import iotests
from iotests import log


def qemu_io(path, *cmds, fmt='qcow2'):
    """Run qemu-io commands on an image or NBD URI; (exit status, output)."""
    args = ['qemu-io', '-f', fmt]
    for c in cmds:
        args += ['-c', c]
    r = subprocess.run(args + [path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return r.returncode, r.stdout


class Transcript:
    """Runs commands on one daemon and records requests, replies and events in arrival order."""

    def __init__(self, reference):
        self.name = 'qsd' if reference else 'blockd'
        self.pre = os.path.join(iotests.TEST_DIR, self.name + '-')
        self.nbd = os.path.join(iotests.SOCK_DIR, self.name + '-nbd.sock')
        self.d = iotests.Daemon([], reference=reference, name=self.name)
        self.c = self.d.qmp_client
        self.lines = []

    def _msg(self, m):
        if 'event' in m:
            self.lines.append('event %s %s' % (m['event'], json.dumps(m.get('data'), sort_keys=True)))
        else:
            self.lines.append('  ' + json.dumps(m, sort_keys=True))

    def cmd(self, _name, quiet=False, **args):
        """Run a command; `quiet` records only the events that arrive before its reply."""
        if not quiet:
            self.lines.append('> %s %s' % (_name, json.dumps(args, sort_keys=True)))
        self.c.send_raw(json.dumps({'execute': _name, 'arguments': args}))
        while True:
            m = self.c.recv()
            if m is None:
                raise RuntimeError('%s closed the monitor' % self.name)
            if 'event' in m or not quiet:
                self._msg(m)
            if 'event' not in m:
                return m

    def wait(self, job, status):
        """Read events until `job` reaches `status` (those already seen count)."""
        want = 'event JOB_STATUS_CHANGE %s' % json.dumps({'id': job, 'status': status}, sort_keys=True)
        while want not in self.lines:
            m = self.c.recv()
            if m is None:
                raise RuntimeError('%s closed the monitor' % self.name)
            self._msg(m)

    def wait_event(self, event):
        """Read until `event` arrived (one already seen counts)."""
        while not any(ln.startswith('event %s ' % event) for ln in self.lines):
            m = self.c.recv()
            if m is None:
                raise RuntimeError('%s closed the monitor' % self.name)
            self._msg(m)

    def wait_offset(self, job, offset):
        """Poll query-block-jobs (unlogged) until `job` has copied `offset` bytes, then log one."""
        for _ in range(100000):
            r = self.cmd('query-block-jobs', quiet=True)['return']
            if [j for j in r if j['device'] == job and j['offset'] >= offset]:
                break
        self.cmd('query-block-jobs')

    def bitmaps(self, node):
        """The named bitmaps of `node` as one line: name, count, busy, recording (QSD also lists
        unnamed internal ones, e.g. copy-before-write's)."""
        r = self.cmd('query-named-block-nodes', quiet=True)['return']
        n = [x for x in r if x['node-name'] == node][0]
        bm = [(b['name'], b['count'], b['busy'], b['recording']) for b in n.get('dirty-bitmaps', []) if 'name' in b]
        self.lines.append('bitmaps of %s: %s' % (node, json.dumps(bm)))

    def nodes(self):
        """Node names and drivers, as one line (automatic names shown as #auto)."""
        r = self.cmd('query-named-block-nodes', quiet=True)['return']
        self.lines.append('nodes: %s' % json.dumps(sorted('%s:%s' % (auto(n['node-name']), n['drv']) for n in r)))

    def export_nodes(self):
        """Which node each export uses, as one line."""
        r = self.cmd('query-block-exports', quiet=True)['return']
        self.lines.append('exports: %s' % json.dumps(sorted('%s:%s' % (e['id'], auto(e['node-name'])) for e in r)))

    def guest_write(self, export, pattern, offset, length):
        """Write through an NBD export with qemu-io (a guest write while a job runs)."""
        rc, _ = qemu_io('nbd+unix:///%s?socket=%s' % (export, self.nbd),
                        'write -P %d %d %d' % (pattern, offset, length), fmt='raw')
        self.lines.append('guest write to %s -P %d %d %d: exit %d' % (export, pattern, offset, length, rc))

    def quit(self):
        self.cmd('quit')
        self.c.close()
        return self.d._reap(60)


def auto(name):
    return re.sub(r'^#block\d+$', '#auto', name)


def run_both(scenario):
    """Run `scenario` on QSD, then blockd; return {name: (lines, exit status)}."""
    results = {}
    for ref in (True, False):
        t = Transcript(ref)
        try:
            rc = scenario(t)
        except Exception:
            # What happened before the failure, for whoever reads the .out.bad.
            log('\n'.join(['%s transcript up to the failure:' % t.name] + t.lines[-40:]))
            raise
        lines = [ln.replace(t.pre, os.path.join(iotests.TEST_DIR, 'D-')).replace(t.nbd, 'NBD_SOCK')
                 for ln in t.lines]
        results[t.name] = (lines, rc)
    return results


def print_side_by_side(results, title):
    ours, theirs = results['blockd'][0], results['qsd'][0]
    log('== %s (blockd; QSD lines shown only where they differ)' % title)
    sm = difflib.SequenceMatcher(a=theirs, b=ours, autojunk=False)
    for op, a0, a1, b0, b1 in sm.get_opcodes():
        for ln in ours[b0:b1]:
            log(ln)
        if op != 'equal':
            for ln in theirs[a0:a1]:
                log('QSD DIFFERS: ' + ln)
    log('quit: blockd exit %d, qsd exit %d' % (results['blockd'][1], results['qsd'][1]))


def check_and_compare(names, pattern):
    """qemu-img check each of blockd's images and compare it with QSD's (`pattern` % name)."""
    for name in names:
        ours = os.path.join(iotests.TEST_DIR, 'blockd-' + pattern % name)
        ref = os.path.join(iotests.TEST_DIR, 'qsd-' + pattern % name)
        rc, out = iotests.run(['qemu-img', 'check', '-q', ours], log_output=False)
        crc, cout = iotests.run(['qemu-img', 'compare', '-q', ours, ref], log_output=False)
        log('%s: check exit %d%s; compare with QSD exit %d%s' % (
            pattern % name, rc, (' ' + out.strip()) if out.strip() else '', crc,
            (' ' + cout.strip()) if cout.strip() else ''))


def check_patterns(image, cmds):
    """qemu-io read -P checks on one of blockd's images, one line each."""
    path = os.path.join(iotests.TEST_DIR, 'blockd-' + image)
    for c in cmds:
        rc, out = qemu_io(path, c)
        ok = rc == 0 and 'Pattern verification failed' not in out
        log('%s %s: %s' % (image, c, 'ok' if ok else 'FAILED'))



def verb(t, name, job, until=None, **args):
    """Run a job verb and, when `until` is a status, read until `job` reached it. The reply is
    logged first, then the events: whether a daemon sends them before or after the reply
    depends on whether the job was asleep or in a copy when the verb came."""
    t.lines.append('> %s %s' % (name, json.dumps(args, sort_keys=True)))
    t.c.send_raw(json.dumps({'execute': name, 'arguments': args}))
    reply, events = None, []
    want = {'id': job, 'status': until}
    while reply is None or (until is not None and want not in [e.get('data') for e in events]):
        m = t.c.recv()
        if m is None:
            raise RuntimeError('%s closed the monitor' % t.name)
        if 'event' in m:
            events.append(m)
        else:
            reply = m
    t.lines.append('  ' + json.dumps(reply, sort_keys=True))
    for m in events:
        t._msg(m)
    return reply


def mask_slow_offsets(results):
    """Replace the offset of BLOCK_JOB_CANCELLED and current-progress of jobs with speed 1: how
    many chunks a job limited to 1 byte/s copied depends on how often it was woken (QSD lets one
    chunk through after each wake; blockd waits out the rate limit)."""
    out = {}
    for name, (lines, rc) in results.items():
        lines = [re.sub(r'("offset": )\d+(, "speed": 1, )', r'\1OFFSET\2', ln) for ln in lines]
        out[name] = (lines, rc)
    return out


def pause_resume_cancel(t, start, job):
    """The verbs on a job slowed down to 1 byte/s (`start(job)` starts it) while it copies:
    job-pause, a second pause, query-jobs, job-resume, block-job-pause, a block-job-cancel refused
    while paused, block-job-resume, then job-cancel; a second job is paused and cancelled with
    block-job-cancel force."""
    start(job)
    verb(t, 'job-pause', job, 'paused', id=job)
    verb(t, 'job-pause', job, id=job)
    t.cmd('query-jobs')
    verb(t, 'job-resume', job, 'running', id=job)
    verb(t, 'block-job-pause', job, 'paused', device=job)
    verb(t, 'block-job-cancel', job, device=job)
    verb(t, 'block-job-resume', job, 'running', device=job)
    verb(t, 'job-cancel', job, 'null', id=job)
    t.cmd('query-jobs')
    job2 = job + '-forced'
    start(job2)
    verb(t, 'block-job-pause', job2, 'paused', device=job2)
    verb(t, 'block-job-cancel', job2, 'null', device=job2, force=True)
    t.cmd('query-jobs')

"""Helpers for blockd iotests (Python 3, standard library only).

A test imports this module, starts blockd (or qemu-storage-daemon as the reference) with
`Daemon(...)`, talks QMP through `vm.qmp(...)` / `vm.qmp_log(...)` and prints what it sees;
iotests/check compares the printed output with the test's golden `.out` file.
"""

import atexit
import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

TEST_DIR = os.environ.get('TEST_DIR', '/tmp')
SOCK_DIR = os.environ.get('SOCK_DIR', '/tmp')
BLOCKD = os.environ.get('BLOCKD', os.path.join(os.path.dirname(__file__), '..', 'bin', 'blockd'))
QSD = shutil.which('qemu-storage-daemon') or 'qemu-storage-daemon'


def notrun(reason):
    """Mark the test as not run (a failure under CI=true) and exit."""
    path = os.environ.get('NOTRUN_FILE')
    if path:
        with open(path, 'w') as f:
            f.write(reason + '\n')
    print('not run: ' + reason, file=sys.stderr)
    sys.exit(0)


def require_tools(*tools):
    for t in tools:
        if shutil.which(t) is None:
            notrun('%s not installed' % t)


def require_libnbd():
    try:
        import nbd  # noqa: F401
    except ImportError:
        notrun('python3 libnbd binding not installed')


def log(msg=''):
    if not isinstance(msg, str):
        msg = json.dumps(msg, sort_keys=True)
    print(msg, flush=True)


def filter_qmp(obj):
    """Replace values that change from run to run (timestamps)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == 'timestamp' and isinstance(v, dict):
                out[k] = {'seconds': 'SECS', 'microseconds': 'USECS'}
            else:
                out[k] = filter_qmp(v)
        return out
    if isinstance(obj, list):
        return [filter_qmp(x) for x in obj]
    return obj


def dumps(obj):
    return json.dumps(filter_qmp(obj), sort_keys=True)


_QEMU_IO_TIMING = re.compile(r'^(.*), \d+ ops; [0-9:.]+ sec \(.*\)$', re.M)


def filter_qemu_io(text):
    """Drop the timing part of qemu-io's summary lines."""
    return _QEMU_IO_TIMING.sub(r'\1, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)', text)


def run(cmd, check=False, log_output=True, env=None):
    """Run a command, print its filtered output (stdout+stderr) and return (rc, output)."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = filter_qemu_io(p.stdout)
    if log_output and out:
        sys.stdout.write(out if out.endswith('\n') else out + '\n')
        sys.stdout.flush()
    if check and p.returncode != 0:
        raise RuntimeError('%s failed with %d: %s' % (cmd, p.returncode, out))
    return p.returncode, out


class QmpClient:
    """A minimal QMP client over a stream socket (unix path or (host, port))."""

    def __init__(self, address, timeout=30.0):
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buf = b''
        self.events = []
        self.greeting = self.recv()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send_raw(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv(self):
        """The next message, or None at EOF."""
        while b'\n' not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line.decode())

    def recv_reply(self):
        """The next reply; events met on the way are kept in self.events."""
        while True:
            msg = self.recv()
            if msg is None or 'event' not in msg:
                return msg
            self.events.append(msg)

    def cmd(self, name, args=None, cmd_id=None):
        req = {'execute': name}
        if args is not None:
            req['arguments'] = args
        if cmd_id is not None:
            req['id'] = cmd_id
        self.send_raw(json.dumps(req))
        return self.recv_reply()

    def take_events(self):
        ev, self.events = self.events, []
        return ev


_RUNNING = []


@atexit.register
def _stop_leftovers():
    """A test that fails half-way must not leave its daemons running."""
    for proc in _RUNNING:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Daemon:
    """blockd (default) or qemu-storage-daemon with a QMP monitor on a unix socket."""

    def __init__(self, args=(), name='blockd', binary=None, reference=False, monitor=True,
                 negotiate=True, wait_ready=True, extra_env=None):
        self.name = name
        self.binary = binary or (QSD if reference else BLOCKD)
        self.qmp_path = os.path.join(SOCK_DIR, '%s-qmp.sock' % name)
        self.pidfile = os.path.join(TEST_DIR, '%s.pid' % name)
        self.stderr_path = os.path.join(TEST_DIR, '%s.stderr' % name)
        cmd = [self.binary]
        if monitor:
            cmd += ['--chardev', 'socket,id=qmp0,path=%s,server=on,wait=off' % self.qmp_path,
                    '--monitor', 'qmp0']
        cmd += list(args)
        cmd += ['--pidfile', self.pidfile]
        env = dict(os.environ)
        if extra_env:
            env.update(extra_env)
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)     # left by a killed predecessor: readiness means a new one
        self.stderr = open(self.stderr_path, 'w+')
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, env=env)
        _RUNNING.append(self.proc)
        self.qmp_client = None
        if wait_ready:
            self.wait_ready()
            if monitor:
                self.qmp_client = QmpClient(self.qmp_path)
                if negotiate:
                    self.qmp_client.cmd('qmp_capabilities')

    def wait_ready(self, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if os.path.exists(self.pidfile):
                return
            if self.proc.poll() is not None:
                raise RuntimeError('%s exited with %d during startup: %s'
                                   % (self.name, self.proc.returncode, self.read_stderr()))
            time.sleep(0.02)
        raise RuntimeError('%s not ready after %ss' % (self.name, timeout))

    def read_stderr(self):
        self.stderr.flush()
        with open(self.stderr_path) as f:
            return f.read()

    def qmp(self, _command, **args):
        """Run a command; keyword names use '_' for '-' (node_name -> node-name)."""
        return self.qmp_client.cmd(_command, {k.replace('_', '-'): v for k, v in args.items()} or None)

    def qmp_log(self, name, args=None, filters=()):
        """Send a command and print the request and the reply (key-sorted), and events."""
        req = {'execute': name}
        if args is not None:
            req['arguments'] = args
        log(dumps(req))
        reply = self.qmp_client.cmd(name, args)
        for ev in self.qmp_client.take_events():
            log(dumps(ev))
        for f in filters:
            reply = f(reply)
        log(dumps(reply))
        return reply

    def events(self):
        return self.qmp_client.take_events()

    def stop(self, sig=signal.SIGTERM, timeout=30.0):
        if self.qmp_client:
            self.qmp_client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self._reap(timeout)

    def _reap(self, timeout):
        """Wait for the exit (kill after `timeout` s) and return the exit status."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.stderr.close()
        return rc

    def quit(self, timeout=30.0):
        """QMP quit; print nothing; return the exit status."""
        try:
            self.qmp_client.cmd('quit')
        except (OSError, ValueError):
            pass
        self.qmp_client.close()
        return self._reap(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()

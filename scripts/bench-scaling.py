#!/usr/bin/python3
"""bench-scaling: how blockd and qemu-storage-daemon scale with connections,
exports and idle clients (issue 14, docs/performance.md "Scaling").

  npm run bench:scaling [-- --rounds N] [--duration S] [--only PHASES] [...]

Phases (each server is started fresh for every measurement, on the same raw
image, the servers interleaved: A B A B, or A B B A with --order abba):

  conns    4 KiB random read IOPS and server CPU per request with 1, 2, 4, 8
           connections (fio jobs, --qd each) on one export
  exports  the same with 1, 8, 64 exports of one raw node; --export-clients
           connections (default 64) spread round-robin over the exports
  idle     memory per idle connection: the server's RSS (and PSS) before and
           after --idle-clients (default 1000) libnbd clients completed the
           handshake (OPT_GO) and stay connected, divided by that count

Server CPU is utime+stime of the server process, its threads and its child
processes (/proc/PID/stat, nbdbench.CpuMeter) over one fio run, divided by the
requests fio completed in that run. Every fio run is preceded by an untimed
warm-up of --ramp seconds on the same server.

Runs with /usr/bin/python3 (Debian's python3-libnbd) and uses the shared
harness's nbdbench.py (NBD_BENCH_DIR, default ../shared/bench).
"""
import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
BENCH = os.environ.get("NBD_BENCH_DIR",
                       os.path.join(os.path.dirname(ROOT), "shared", "bench"))
sys.path.insert(0, BENCH)
import nbdbench as nb  # noqa: E402

nbd = nb.nbd
PHASES = ["conns", "exports", "idle"]
SERVERS = ["blockd", "qsd"]
REF = "qsd"
MAX_IDLE = 10000


def metric_defs(conns, exports):
    """key -> (unit, higher_is_better, description), in table order."""
    m = {}
    for n in conns:
        m["randread_c%d_iops" % n] = (
            "IOPS", True, "4 KiB randread, %d conn(s), 1 export" % n)
    for n in conns:
        m["cpu_c%d_us" % n] = (
            "us/req", False, "server CPU per request, %d conn(s)" % n)
    for e in exports:
        m["randread_e%d_iops" % e] = (
            "IOPS", True, "4 KiB randread, %d export(s)" % e)
    for e in exports:
        m["cpu_e%d_us" % e] = (
            "us/req", False, "server CPU per request, %d export(s)" % e)
    m["idle_rss_kib_per_conn"] = ("KiB", False, "RSS per idle connection")
    m["idle_pss_kib_per_conn"] = ("KiB", False, "PSS per idle connection")
    m["rss_base_mib"] = ("MiB", False, "RSS before the idle clients")
    m["rss_idle_mib"] = ("MiB", False, "RSS with the idle clients")
    return m


# ------------------------------------------------------------- servers

def server_argv(kind, image, sock, exports):
    common = ["--blockdev", "driver=file,node-name=f,filename=" + image,
              "--blockdev", "driver=raw,node-name=r,file=f",
              # unlimited on both (QSD's and blockd's default cap is 100)
              "--nbd-server",
              "addr.type=unix,addr.path=%s,max-connections=0" % sock]
    for i in range(exports):
        common += ["--export",
                   "type=nbd,id=e%d,node-name=r,name=x%d,writable=on"
                   % (i, i)]
    if kind == "blockd":
        return [os.path.join(ROOT, "bin", "blockd"), "--log-level",
                "warn"] + common
    return ["qemu-storage-daemon"] + common


class Server:
    """One fresh server process in its own session and temporary dir."""

    def __init__(self, kind, image, exports):
        self.kind = kind
        self.exports = exports
        self.dir = tempfile.mkdtemp(prefix="h7-bench-scaling.")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.argv = server_argv(kind, image, self.sock, exports)
        self.log_path = os.path.join(self.dir, "server.log")
        self.proc = None
        self.log = None

    def uri(self, i=0):
        return "nbd+unix:///x%d?socket=%s" % (i, self.sock)

    def start(self, timeout=30):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log,
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        alive = lambda: self.proc.poll() is None  # noqa: E731
        try:
            info = nb.wait_ready(self.uri(0), timeout, alive)
            if self.exports > 1:
                nb.wait_ready(self.uri(self.exports - 1), timeout, alive)
        except (TimeoutError, RuntimeError) as e:
            self.stop()
            raise RuntimeError("%s: %s\n--- server log ---\n%s"
                               % (self.kind, e, self.tail_log()))
        return info

    def tail_log(self, n=1500):
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.log:
            self.log.close()
            self.log = None

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------- fio

def fio_jobfile(path, uris, qd, size, runtime):
    lines = ["[global]", "ioengine=nbd", "thread", "group_reporting",
             "rw=randread", "bs=4k", "iodepth=%d" % qd, "norandommap",
             "randrepeat=0", "size=%d" % size, "time_based",
             # fio takes whole seconds or a unit ("0.5" would be 0: forever)
             "runtime=%dms" % max(1, round(runtime * 1000)), ""]
    for i, u in enumerate(uris):
        lines += ["[j%d]" % i, "uri=" + u, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def run_fio(jobfile, out, timeout):
    p = subprocess.run(["fio", "--output-format=json", "--output=" + out,
                        jobfile], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    text = open(out).read() if os.path.exists(out) else ""
    lines = text.splitlines()
    # the nbd engine logs "fio: connected to NBD server" before the JSON
    start = next((i for i, ln in enumerate(lines) if ln == "{"), None)
    if p.returncode != 0 or start is None:
        raise RuntimeError("fio failed (rc=%d): %s %s" % (
            p.returncode, p.stderr.strip()[-500:], text.strip()[-500:]))
    job = json.loads("\n".join(lines[start:]))["jobs"][0]
    if job.get("error"):
        raise RuntimeError("fio job error %s" % job["error"])
    return job


def measure_randread(srv, uris, qd, size, a, tmp, label):
    """Warm-up, then one timed fio run; IOPS and server CPU per request."""
    meter = nb.CpuMeter([srv.proc.pid])
    jf = os.path.join(tmp, label + ".fio")
    out = os.path.join(tmp, label + ".json")
    if a.ramp > 0:
        fio_jobfile(jf, uris, qd, size, a.ramp)
        run_fio(jf, out, a.ramp + 60)
    fio_jobfile(jf, uris, qd, size, a.duration)
    c0, h0, t0 = meter.read(), nb.host_cpu(), time.monotonic()
    job = run_fio(jf, out, a.duration + 60)
    c1, h1, wall = meter.read(), nb.host_cpu(), time.monotonic() - t0
    ios = job["read"]["total_ios"]
    if not ios:
        raise RuntimeError("fio completed no requests")
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "iops": round(job["read"]["iops"]),
        "requests": ios,
        "server_cpu_s": round(c1 - c0, 3),
        "cpu_us_per_req": round((c1 - c0) / ios * 1e6, 2),
        "server_cpu_pct": round(100 * (c1 - c0) / wall, 1),
        "host_busy_pct": round(100 * (h1[0] - h0[0]) / (wall * tick), 1),
        "steal_pct": round(100 * (h1[1] - h0[1]) / (wall * tick), 1),
        "connections": len(uris), "iodepth_per_conn": qd,
        "exports_used": len(set(uris)),
    }


# ------------------------------------------------------------- memory

def proc_mem_kib(pid):
    """(VmRSS, Pss) in KiB of one process."""
    rss = pss = None
    with open("/proc/%d/status" % pid) as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                rss = int(ln.split()[1])
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for ln in f:
                if ln.startswith("Pss:"):
                    pss = int(ln.split()[1])
    except OSError:
        pass
    return rss, pss


def settle_mem(pid, secs):
    """Sleep, then the median of 5 readings 0.1 s apart."""
    time.sleep(secs)
    vals = []
    for _ in range(5):
        vals.append(proc_mem_kib(pid))
        time.sleep(0.1)
    rss = statistics.median(v[0] for v in vals)
    pss = (statistics.median(v[1] for v in vals)
           if all(v[1] is not None for v in vals) else None)
    return rss, pss


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise SystemExit("RLIMIT_NOFILE hard limit %d < %d needed"
                             % (hard, need))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def measure_idle(srv, n, settle):
    uri = srv.uri(0)
    pid = srv.proc.pid
    # the same warm-up for both servers: 100 connect/disconnect cycles
    for _ in range(100):
        h = nbd.NBD()
        h.connect_uri(uri)
        h.shutdown()
        del h
    base = settle_mem(pid, settle)
    handles = []
    t0 = time.monotonic()
    try:
        for _ in range(n):
            h = nbd.NBD()
            h.connect_uri(uri)      # handshake done: OPT_GO answered
            handles.append(h)
        open_s = time.monotonic() - t0
        if srv.proc.poll() is not None:
            raise RuntimeError("server exited while clients connected")
        idle = settle_mem(pid, settle)
        # every client is still served (answers a 4 KiB read)
        for h in (handles[0], handles[-1]):
            h.pread(4096, 0)
    finally:
        for h in handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        handles.clear()
    after = settle_mem(pid, settle)
    res = {
        "clients": n, "open_s": round(open_s, 2),
        "rss_base_kib": base[0], "rss_idle_kib": idle[0],
        "rss_after_close_kib": after[0],
        "idle_rss_kib_per_conn": round((idle[0] - base[0]) / n, 2),
    }
    if base[1] is not None and idle[1] is not None:
        res.update({"pss_base_kib": base[1], "pss_idle_kib": idle[1],
                    "idle_pss_kib_per_conn": round((idle[1] - base[1]) / n,
                                                   2)})
    return res


# ------------------------------------------------------------- driver

def with_server(kind, a, exports, fn):
    subprocess.run(["bash", "-c", 'cat "$1" > /dev/null', "-", a.image],
                   check=True)
    srv = Server(kind, a.image, exports)
    try:
        info = srv.start()
        out = fn(srv, info)
        if srv.proc.poll() is not None:
            raise RuntimeError("server exited during the run:\n"
                               + srv.tail_log())
        return out
    finally:
        srv.stop()
        srv.cleanup()


def run_conns(kind, a, tmp):
    def fn(srv, info):
        metrics, details = {}, {}
        size = info["size"] // 4096 * 4096
        for n in a.conns:
            r = measure_randread(srv, [srv.uri(0)] * n, a.qd, size, a, tmp,
                                 "c%d" % n)
            metrics["randread_c%d_iops" % n] = r["iops"]
            metrics["cpu_c%d_us" % n] = r["cpu_us_per_req"]
            details["c%d" % n] = r
            log("  %-8s %d conn x QD%d: %7d IOPS  %6.2f us/req  [cpu%% "
                "server %s, machine %s, steal %s]" % (
                    kind, n, a.qd, r["iops"], r["cpu_us_per_req"],
                    r["server_cpu_pct"], r["host_busy_pct"], r["steal_pct"]))
        return metrics, details
    return with_server(kind, a, 1, fn)


def run_exports(kind, a, tmp, e):
    def fn(srv, info):
        size = info["size"] // 4096 * 4096
        uris = [srv.uri(i % e) for i in range(a.export_clients)]
        r = measure_randread(srv, uris, a.export_qd, size, a, tmp,
                             "e%d" % e)
        log("  %-8s %2d export(s), %d conn x QD%d: %7d IOPS  %6.2f us/req  "
            "[cpu%% server %s, machine %s, steal %s]" % (
                kind, e, a.export_clients, a.export_qd, r["iops"],
                r["cpu_us_per_req"], r["server_cpu_pct"], r["host_busy_pct"],
                r["steal_pct"]))
        return ({"randread_e%d_iops" % e: r["iops"],
                 "cpu_e%d_us" % e: r["cpu_us_per_req"]}, {"e%d" % e: r})
    return with_server(kind, a, e, fn)


def run_idle(kind, a, tmp):
    def fn(srv, info):
        r = measure_idle(srv, a.idle_clients, a.settle)
        log("  %-8s %d idle clients (opened in %.2fs): RSS %d -> %d KiB, "
            "%.2f KiB/conn; PSS %.2f KiB/conn; RSS after closing %d KiB" % (
                kind, r["clients"], r["open_s"], r["rss_base_kib"],
                r["rss_idle_kib"], r["idle_rss_kib_per_conn"],
                r.get("idle_pss_kib_per_conn", float("nan")),
                r["rss_after_close_kib"]))
        m = {"idle_rss_kib_per_conn": r["idle_rss_kib_per_conn"],
             "rss_base_mib": round(r["rss_base_kib"] / 1024, 1),
             "rss_idle_mib": round(r["rss_idle_kib"] / 1024, 1)}
        if "idle_pss_kib_per_conn" in r:
            m["idle_pss_kib_per_conn"] = r["idle_pss_kib_per_conn"]
        return m, {"idle": r}
    return with_server(kind, a, 1, fn)


def log(s):
    print(s, flush=True)


def int_list(s):
    return [int(x) for x in s.split(",") if x.strip()]


def summarize(runs, defs):
    summary = {}
    for key in defs:
        per = {}
        for n in SERVERS:
            vals = [r["metrics"][key] for r in runs
                    if r["server"] == n and key in r.get("metrics", {})]
            if vals:
                per[n] = {"median": statistics.median(vals),
                          "min": min(vals), "max": max(vals),
                          "values": vals}
        if per:
            summary[key] = per
    ratios = {}
    for key, per in summary.items():
        if "blockd" in per and REF in per and per[REF]["median"]:
            ratios[key] = {"blockd": per["blockd"]["median"]
                           / per[REF]["median"]}
    return summary, ratios


def print_table(summary, ratios, defs, rounds):
    rows = []
    for key, per in summary.items():
        unit, better, _ = defs[key]
        r = ratios.get(key, {}).get("blockd")
        spreads = ["%d%%" % round(100 * (per[n]["max"] - per[n]["min"])
                                  / per[n]["median"])
                   for n in SERVERS if n in per and per[n]["median"]]
        rows.append([key, unit + {True: " +", False: " -"}[better]]
                    + [nb.fmt(per[n]["median"]) if n in per else "n/a"
                       for n in SERVERS]
                    + ["n/a" if r is None else "%.2f" % r,
                       "/".join(spreads)])
    print("\nMedians of %d round(s) (unit '+': higher is better, '-': lower "
          "is better; spread: (max-min)/median per server)" % rounds)
    print(nb.table(["metric", "unit"] + SERVERS + ["blockd/qsd", "spread"],
                   rows))


def main():
    ap = argparse.ArgumentParser(prog="bench-scaling",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; each server once per phase and round "
                         "(default 3)")
    ap.add_argument("--order", choices=["abab", "abba"], default="abab",
                    help="abba reverses the server order every second round")
    ap.add_argument("--duration", type=float, default=3.0,
                    help="seconds per fio measurement (default 3)")
    ap.add_argument("--ramp", type=float, default=1.0,
                    help="untimed fio warm-up before each measurement "
                         "(default 1)")
    ap.add_argument("--only", metavar="LIST",
                    help="comma list of phases: " + ", ".join(PHASES))
    ap.add_argument("--conns", type=int_list, default=[1, 2, 4, 8],
                    metavar="LIST", help="connection counts (default 1,2,4,8)")
    ap.add_argument("--qd", type=int, default=8,
                    help="queue depth per connection in 'conns' (default 8)")
    ap.add_argument("--exports", type=int_list, default=[1, 8, 64],
                    metavar="LIST", help="export counts (default 1,8,64)")
    ap.add_argument("--export-clients", type=int, default=64,
                    help="connections in 'exports', spread round-robin "
                         "(default 64; at least the largest export count)")
    ap.add_argument("--export-qd", type=int, default=2,
                    help="queue depth per connection in 'exports' (default 2)")
    ap.add_argument("--idle-clients", type=int, default=1000,
                    help="idle connections in 'idle' (default 1000, max %d)"
                         % MAX_IDLE)
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds to wait before reading the memory "
                         "(default 1)")
    ap.add_argument("--image", default=os.path.join(ROOT, ".bench", "images",
                                                    "raw.img"),
                    help="raw image (default .bench/images/raw.img, made by "
                         "nbd-bench-mkimages when missing)")
    ap.add_argument("--json", metavar="FILE",
                    help="default .bench/scaling-DATE.json")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="subset of blockd,qsd to run (ratios need both)")
    a = ap.parse_args()
    # SIGTERM (e.g. from timeout) unwinds like Ctrl-C: the finally blocks stop
    # the running server (it is in its own session) and fio
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    phases = PHASES
    if a.only:
        phases = [p.strip() for p in a.only.split(",") if p.strip()]
        bad = [p for p in phases if p not in PHASES]
        if bad:
            ap.error("unknown phase(s) %s (known: %s)"
                     % (", ".join(bad), ", ".join(PHASES)))
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    if not servers or any(s not in SERVERS for s in servers):
        ap.error("--servers: a subset of blockd,qsd")
    if not 1 <= a.idle_clients <= MAX_IDLE:
        ap.error("--idle-clients must be 1..%d" % MAX_IDLE)
    if "exports" in phases and a.export_clients < max(a.exports):
        ap.error("--export-clients must be >= the largest export count")
    if a.rounds < 1 or a.duration <= 0:
        ap.error("--rounds >= 1 and --duration > 0")
    if not os.path.exists(a.image):
        if a.image != ap.get_default("image"):
            ap.error("no image " + a.image)
        subprocess.run([os.path.join(BENCH, "nbd-bench-mkimages"),
                        os.path.dirname(a.image)], check=True)
    if not os.path.exists(os.path.join(ROOT, "dist", "cli", "main.js")):
        subprocess.run(["npm", "run", "--silent", "build"], cwd=ROOT,
                       check=True)
    # the idle phase holds idle_clients sockets; servers inherit the limit
    raise_nofile(a.idle_clients + 1024)
    out = a.json or os.path.join(ROOT, ".bench", time.strftime(
        "scaling-%Y%m%d-%H%M%S.json"))
    defs = metric_defs(a.conns, a.exports)

    steps = []
    if "conns" in phases:
        steps.append(("conns", None))
    if "exports" in phases:
        steps += [("exports", e) for e in a.exports]
    if "idle" in phases:
        steps.append(("idle", None))

    tmp = tempfile.mkdtemp(prefix="h7-bench-scaling-fio.")
    runs, errors = [], []
    started = time.monotonic()
    try:
        for rnd in range(1, a.rounds + 1):
            order = list(servers)
            if a.order == "abba" and rnd % 2 == 0:
                order.reverse()
            for phase, e in steps:
                log("== round %d/%d: %s%s" % (rnd, a.rounds, phase,
                                             "" if e is None else " %d" % e))
                for kind in order:
                    entry = {"round": rnd, "server": kind, "phase": phase,
                             "exports": 1 if e is None else e,
                             "argv": server_argv(kind, a.image, "{sock}",
                                                 1 if e is None else e)}
                    try:
                        if phase == "conns":
                            m, d = run_conns(kind, a, tmp)
                        elif phase == "exports":
                            m, d = run_exports(kind, a, tmp, e)
                        else:
                            m, d = run_idle(kind, a, tmp)
                        entry["metrics"], entry["details"] = m, d
                    except (RuntimeError, OSError, nbd.Error,
                            subprocess.SubprocessError) as ex:
                        entry["error"] = str(ex)
                        errors.append(entry)
                        log("  !! %s: %s" % (kind, ex))
                    runs.append(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary, ratios = summarize(runs, defs)
    print_table(summary, ratios, defs, a.rounds)
    for r in errors:
        print("round %d %s %s: %s" % (r["round"], r["server"], r["phase"],
                                      r["error"]))
    print("\ntotal %.0fs" % (time.monotonic() - started))
    doc = {"tool": "bench-scaling", "env": nb.environment(),
           "image": a.image, "rounds": a.rounds, "order": a.order,
           "servers": [{"name": s} for s in servers], "ref": REF,
           "duration_s": a.duration, "ramp_s": a.ramp, "phases": phases,
           "params": {"conns": a.conns, "qd": a.qd, "exports": a.exports,
                      "export_clients": a.export_clients,
                      "export_qd": a.export_qd,
                      "idle_clients": a.idle_clients, "settle_s": a.settle},
           "units": {k: v[0] for k, v in defs.items()},
           "better": {k: ("higher" if v[1] else "lower")
                      for k, v in defs.items()},
           "descriptions": {k: v[2] for k, v in defs.items()},
           "summary": summary, "ratios": ratios, "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    print("JSON written to %s" % out)
    # bar chart of the ratios next to the JSON (scripts/bench-plot.py)
    if len(servers) == 2:
        subprocess.run(["/usr/bin/python3",
                        os.path.join(ROOT, "scripts", "bench-plot.py"), out,
                        "--quiet", "--svg", os.path.splitext(out)[0]
                        + ".svg"])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

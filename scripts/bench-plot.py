#!/usr/bin/python3
"""bench-plot: ratio table (with the issue 14 targets, met/missed) and an SVG
bar chart of the ratios of nbd-bench-vs and bench-scaling JSON files.

  bench-plot.py FILE.json [FILE.json ...] [--svg OUT.svg] [--kind raw|qcow2]
                [--server NAME] [--ref NAME] [--markdown] [--quiet]

Each file becomes one table and one panel of the SVG. The kind of image of an
nbd-bench-vs file (which targets apply) is read from its server commands
(driver=qcow2 -> qcow2) unless --kind is given; bench-scaling files have no
targets. No third-party Python modules: the SVG is written by hand.
"""
import argparse
import json
import math
import os
import sys
import textwrap
from xml.sax.saxutils import escape

# issue 14 ("Performance, second pass"): metric -> (">=" | "<=", ratio)
TARGETS = {
    "raw": {
        "randread_qd32_iops": (">=", 2.8),
        "randwrite_qd32_iops": (">=", 2.2),
        "seqread_1c_mibs": (">=", 1.5),
        "seqread_4c_mibs": (">=", 1.5),
        "seqwrite_mibs": (">=", 1.1),
        "lat_qd1_p50_us": ("<=", 0.65),
        "connect_per_s": (">=", 1.0),
    },
    "qcow2": {
        "randread_qd32_iops": (">=", 2.5),
        "randwrite_qd32_iops": (">=", 2.0),
        "seqread_1c_mibs": (">=", 1.5),
        "map_ms": ("<=", 0.8),
        "lat_qd1_p50_us": ("<=", 0.7),
    },
}

# nbd-bench metrics where lower is better, and information-only ones
# (mirrors METRICS in ../shared/bench/nbdbench.py)
VS_LOWER = {"map_ms", "lat_qd1_p50_us", "lat_qd1_p99_us", "flush_s"}
VS_INFO = {"map_extents"}

GREEN, RED, GREY = "#2e8b57", "#c0392b", "#7f8c9a"


def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if abs(v) >= 100:
            return "%.0f" % v
        if abs(v) >= 10:
            return "%.1f" % v
        return "%.2f" % v
    return str(v)


class Panel:
    """The rows of one JSON file: metric, medians, ratio, target, status."""

    def __init__(self, path, doc, server, ref, kind):
        self.path = path
        self.tool = doc.get("tool")
        names = [s["name"] for s in doc.get("servers", [])]
        self.ref = ref or doc.get("ref") or (names[-1] if names else None)
        others = [n for n in names if n != self.ref]
        if server:
            self.server = server
        else:
            self.server = "blockd" if "blockd" in others else (
                others[0] if others else None)
        if self.server is None or self.ref is None:
            raise SystemExit("%s: needs two servers" % path)
        if self.tool == "nbd-bench-vs":
            if kind is None:
                cmds = " ".join(s.get("command", "")
                                for s in doc.get("servers", []))
                kind = "qcow2" if "driver=qcow2" in cmds else "raw"
            self.kind = kind
            targets = TARGETS.get(kind, {})
            self.unmeasured = [k for k in targets
                               if k not in doc.get("summary", {})]
        elif self.tool == "bench-scaling":
            self.kind = "scaling"
            targets = {}
        else:
            raise SystemExit("%s: not an nbd-bench-vs or bench-scaling "
                             "result" % path)
        if self.tool != "nbd-bench-vs":
            self.unmeasured = []
        self.rounds = doc.get("rounds")
        self.date = doc.get("env", {}).get("date", "")
        units = doc.get("units", {})
        better = doc.get("better", {})
        per_round = self._per_round(doc.get("runs", []))
        self.rows = []
        for key, per in doc.get("summary", {}).items():
            if self.tool == "nbd-bench-vs":
                if key in VS_INFO:
                    continue
                lower = key in VS_LOWER
            else:
                if key in ("rss_base_mib", "rss_idle_mib"):
                    continue   # in the table of bench-scaling itself
                lower = better.get(key) == "lower"
            a, b = per.get(self.server), per.get(self.ref)
            ratio = (a["median"] / b["median"]
                     if a and b and b["median"] else None)
            tgt = targets.get(key)
            status = None
            if tgt and ratio is not None:
                op, val = tgt
                # compare at the printed precision (2 decimals)
                r = round(ratio, 2)
                status = r >= val if op == ">=" else r <= val
            spread = []
            for s in (a, b):
                if s and s["median"]:
                    spread.append("%d%%" % round(
                        100 * (s["max"] - s["min"]) / s["median"]))
            self.rows.append({
                "metric": key, "unit": units.get(key, ""), "lower": lower,
                "a": a["median"] if a else None,
                "b": b["median"] if b else None, "ratio": ratio,
                "target": tgt, "met": status,
                "rounds": per_round.get(key, []),
                "spread": "/".join(spread)})

    def _per_round(self, runs):
        """metric -> [ratio of each round where both servers have it]."""
        by = {}
        for r in runs:
            if "metrics" in r:
                by.setdefault((r["round"], r["server"]), {}).update(
                    r["metrics"])
        out = {}
        for (rnd, srv), m in sorted(by.items()):
            if srv != self.server:
                continue
            refm = by.get((rnd, self.ref), {})
            for k, v in m.items():
                if k in refm and refm[k]:
                    out.setdefault(k, []).append(v / refm[k])
        return out

    def title(self):
        what = {"raw": "raw image", "qcow2": "qcow2 image (frag.qcow2)",
                "scaling": "scaling"}[self.kind]
        return "%s / %s, %s: %s round(s), %s" % (
            self.server, self.ref, what, self.rounds, self.date)

    def table(self, markdown):
        head = ["metric", "unit", self.server, self.ref,
                "%s/%s" % (self.server, self.ref), "rounds", "target",
                "status", "spread"]
        rows = []
        for r in self.rows:
            tgt = ("%s %.2f" % ("≥" if r["target"][0] == ">=" else "≤",
                                r["target"][1]) if r["target"] else "")
            status = {True: "met", False: "MISSED", None: ""}[r["met"]]
            rr = r["rounds"]
            rng = ("%.2f–%.2f" % (min(rr), max(rr))) if len(rr) > 1 else ""
            rows.append([r["metric"], r["unit"] + (" -" if r["lower"]
                                                   else " +"),
                         fmt(r["a"]), fmt(r["b"]),
                         "n/a" if r["ratio"] is None else "%.2f" % r["ratio"],
                         rng, tgt, status, r["spread"]])
        if markdown:
            lines = ["| " + " | ".join(head) + " |",
                     "|" + "|".join(" --- " if i < 2 or i >= 5 else " ---: "
                                    for i in range(len(head))) + "|"]
            lines += ["| " + " | ".join(c for c in row) + " |"
                      for row in rows]
            return "\n".join(lines)
        widths = [max(len(x[i]) for x in [head] + rows)
                  for i in range(len(head))]
        right = {2, 3, 4}

        def line(cells):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))
                             ).rstrip()
        out = [line(head), "  ".join("-" * w for w in widths)]
        return "\n".join(out + [line(x) for x in rows])

    def summary_line(self):
        judged = [r for r in self.rows if r["met"] is not None]
        tail = ("; not measured: " + ", ".join(self.unmeasured)
                if self.unmeasured else "")
        if not judged:
            return ("no targets for this run"
                    if not any(r["target"] for r in self.rows)
                    else "no ratio to judge against the targets") + tail
        met = [r["metric"] for r in judged if r["met"]]
        missed = [r["metric"] for r in judged if not r["met"]]
        return "targets met: %d of %d%s" % (
            len(met), len(judged),
            ("; missed: " + ", ".join(missed)) if missed else "") + tail


# ------------------------------------------------------------------ SVG

W = 900
LABEL_W = 300
PLOT_X0, PLOT_X1 = LABEL_W + 10, W - 70
ROW_H, BAR_H = 26, 14
X_CAP = 5.0


def nice_max(v):
    return max(1.5, math.ceil(v * 1.08 / 0.5) * 0.5)


def svg(panels):
    xmax = 0.0
    for p in panels:
        for r in p.rows:
            for v in [r["ratio"]] + r["rounds"] + (
                    [r["target"][1]] if r["target"] else []):
                if v is not None:
                    xmax = max(xmax, v)
    # larger ratios are drawn to the edge and labelled "off scale"
    xmax = min(nice_max(xmax), X_CAP)
    step = 0.5

    def x(v):
        return PLOT_X0 + (PLOT_X1 - PLOT_X0) * min(v, xmax) / xmax

    out = []
    y = 10
    for p in panels:
        out.append('<text x="10" y="%d" class="h">%s</text>'
                   % (y + 18, escape(p.title())))
        sub = textwrap.wrap(os.path.basename(p.path) + " — "
                            + p.summary_line(), 140)
        for j, ln in enumerate(sub):
            out.append('<text x="10" y="%d" class="s">%s</text>'
                       % (y + 36 + 14 * j, escape(ln)))
        y0 = y + 50 + 14 * (len(sub) - 1)
        y1 = y0 + ROW_H * len(p.rows)
        # grid and axis labels
        v = 0.0
        while v <= xmax + 1e-9:
            gx = x(v)
            out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" '
                       'class="%s"/>' % (gx, y0, gx, y1,
                                         "par" if abs(v - 1) < 1e-9
                                         else "grid"))
            out.append('<text x="%.1f" y="%d" class="ax">%g×</text>'
                       % (gx, y1 + 14, v))
            v += step
        for i, r in enumerate(p.rows):
            ry = y0 + i * ROW_H
            cy = ry + ROW_H / 2
            label = r["metric"] + (" (lower is better)" if r["lower"]
                                   else "")
            out.append('<text x="%d" y="%.1f" class="l">%s</text>'
                       % (LABEL_W, cy + 4, escape(label)))
            if r["ratio"] is None:
                out.append('<text x="%d" y="%.1f" class="v">n/a</text>'
                           % (PLOT_X0 + 4, cy + 4))
                continue
            color = {True: GREEN, False: RED, None: GREY}[r["met"]]
            bw = x(r["ratio"]) - PLOT_X0
            out.append('<rect x="%d" y="%.1f" width="%.1f" height="%d" '
                       'fill="%s"><title>%s: %.3f</title></rect>'
                       % (PLOT_X0, cy - BAR_H / 2, bw, BAR_H, color,
                          escape(r["metric"]), r["ratio"]))
            for rv in r["rounds"]:
                out.append('<circle cx="%.1f" cy="%.1f" r="2.5" '
                           'class="dot"/>' % (x(rv), cy))
            text = "%.2f×" % r["ratio"]
            if r["ratio"] > xmax:
                text += " (off scale)"
            if r["target"]:
                op, tv = r["target"]
                tx = x(tv)
                out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" '
                           'class="tgt"/>' % (tx, cy - BAR_H / 2 - 4, tx,
                                              cy + BAR_H / 2 + 4))
                text += "  (%s %.2f %s)" % (
                    "≥" if op == ">=" else "≤", tv,
                    "met" if r["met"] else "missed")
            tx0 = max([x(r["ratio"])] + [x(v) for v in r["rounds"]]
                      + ([x(r["target"][1])] if r["target"] else [])) + 8
            cls = "v"
            if tx0 + 6.5 * len(text) > W - 4:
                # no room on the right: inside the bar, right-aligned
                tx0, cls = x(r["ratio"]) - 4, "v in"
            out.append('<text x="%.1f" y="%.1f" class="%s">%s</text>'
                       % (tx0, cy + 4, cls, escape(text)))
        y = y1 + 30
    legend = ("bar: median ratio (server/reference) — green: target met, "
              "red: missed, grey: no target; black tick: target; "
              "dashed: parity 1.0×; dots: single rounds")
    out.append('<text x="10" y="%d" class="s">%s</text>'
               % (y + 4, escape(legend)))
    height = y + 16
    style = ("text{font-family:DejaVu Sans,Arial,sans-serif;fill:#222}"
             ".h{font-size:15px;font-weight:bold}.s{font-size:11px;fill:#555}"
             ".l{font-size:12px;text-anchor:end}.v{font-size:11px}"
             ".in{fill:#fff;text-anchor:end}"
             ".ax{font-size:10px;text-anchor:middle;fill:#666}"
             ".grid{stroke:#ddd;stroke-width:1}"
             ".par{stroke:#555;stroke-width:1;stroke-dasharray:4 3}"
             ".tgt{stroke:#000;stroke-width:3}"
             ".dot{fill:#fff;stroke:#222;stroke-width:1}")
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
            'viewBox="0 0 %d %d">\n<style>%s</style>\n'
            '<rect width="100%%" height="100%%" fill="#fff"/>\n%s\n</svg>\n'
            % (W, height, W, height, style, "\n".join(out)))


def main():
    ap = argparse.ArgumentParser(prog="bench-plot",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="nbd-bench-vs or bench-scaling "
                                             "JSON files")
    ap.add_argument("--svg", metavar="OUT", help="write the bar chart here")
    ap.add_argument("--kind", choices=sorted(TARGETS),
                    help="targets for nbd-bench-vs files (default: from the "
                         "server commands)")
    ap.add_argument("--server", help="server to compare (default blockd)")
    ap.add_argument("--ref", help="reference (default: the file's)")
    ap.add_argument("--markdown", action="store_true",
                    help="print Markdown tables")
    ap.add_argument("--quiet", action="store_true", help="no tables")
    a = ap.parse_args()
    panels = []
    for f in a.files:
        with open(f) as fh:
            doc = json.load(fh)
        panels.append(Panel(f, doc, a.server, a.ref, a.kind))
    for p in panels:
        if not a.quiet:
            print("%s\n%s\n\n%s\n%s\n" % (
                os.path.basename(p.path), p.title(), p.table(a.markdown),
                p.summary_line()))
    if a.svg:
        d = os.path.dirname(os.path.abspath(a.svg))
        os.makedirs(d, exist_ok=True)
        with open(a.svg, "w") as fh:
            fh.write(svg(panels))
        print("SVG written to %s" % a.svg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

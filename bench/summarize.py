"""Summarises one `scripts/bench` run.

usage: summarize.py RAW_DIR RESULTS_JSON SUMMARY_MD

RAW_DIR holds one file per measurement, named
`<section>__<name>__<server>__<repeat>.<kind>.json` (kind: load — a
shoal-load report; wrk; startup; rss; size; images; skip) and `meta__<key>.txt`.
Writes the machine-readable results (medians, min and max over repeats,
ratios against each baseline and the vision's targets) and the Markdown
tables of docs/benchmarks.md.
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

LOAD_METRICS = {
    "achieved_rps": lambda r: r["achieved_rps"],
    "p50_ms": lambda r: r["latency"]["p50_ms"],
    "p90_ms": lambda r: r["latency"]["p90_ms"],
    "p99_ms": lambda r: r["latency"]["p99_ms"],
    "p999_ms": lambda r: r["latency"]["p999_ms"],
    "max_ms": lambda r: r["latency"]["max_ms"],
    "sent": lambda r: r["sent"],
    "ok": lambda r: r["ok"],
    "errors": lambda r: r["errors"],
    "timeouts": lambda r: r["timeouts"],
    "unfinished": lambda r: r["unfinished"],
    "queued": lambda r: r["queued"],
    "generator_lag_p99_ms": lambda r: r["generator_lag"]["p99_ms"],
    "window_s": lambda r: r["window_s"],
}
WRK_METRICS = ["rps", "p50_ms", "p99_ms", "errors", "timeouts", "non_2xx"]


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def load_raw(raw):
    meta, groups = {}, defaultdict(list)
    for path in sorted(raw.iterdir()):
        if path.name.startswith("meta__"):
            meta[path.name[len("meta__") : -len(".txt")]] = path.read_text().strip()
            continue
        stem, kind, _ = path.name.rsplit(".", 2)
        section, name, server, repeat = stem.split("__")
        groups[(section, name, server, kind)].append((int(repeat), json.loads(path.read_text())))
    return meta, groups


def aggregate(groups):
    out = {}
    for (section, name, server, kind), runs in sorted(groups.items()):
        runs = [r for _, r in sorted(runs, key=lambda x: x[0])]
        if kind == "load":
            entry = {m: spread([f(r) for r in runs]) for m, f in LOAD_METRICS.items()}
            entry["error_kinds"] = merge_counts(r["error_kinds"] for r in runs)
            entry["runs"] = runs
        elif kind == "wrk":
            entry = {m: spread([r.get(m) for r in runs]) for m in WRK_METRICS}
            entry["runs"] = runs
        else:
            entry = runs[0]
        out.setdefault(section, {}).setdefault(name, {}).setdefault(server, {})[kind] = entry
    return out


def merge_counts(dicts):
    total = defaultdict(int)
    for d in dicts:
        for k, v in d.items():
            total[k] += v
    return dict(total)


def get(results, *path):
    node = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def med(results, *path):
    node = get(results, *path)
    return node["median"] if node else None


def fmt(value, digits=0, unit=""):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{unit}"


def fmt_spread(node, digits=0):
    if not node:
        return "–"
    if node["n"] == 1:
        return fmt(node["median"], digits)
    return f"{fmt(node['median'], digits)} ({fmt(node['min'], digits)}–{fmt(node['max'], digits)})"


def ratio(a, b):
    return a / b if a is not None and b else None


def comparisons(results, meta):
    rows = []

    def add(what, measured, target, met, detail=""):
        rows.append({"what": what, "measured": measured, "target": target, "met": met, "detail": detail})

    gw = med(results, "gateway", "saturation", "gateway", "load", "achieved_rps")
    bare = med(results, "gateway", "saturation", "bare", "load", "achieved_rps")
    fa = med(results, "gateway", "saturation", "fastapi-nosleep", "load", "achieved_rps")
    gw_wrk = med(results, "gateway", "wrk", "gateway", "wrk", "rps")
    bare_wrk = med(results, "gateway", "wrk", "bare", "wrk", "rps")
    fa_wrk = med(results, "gateway", "wrk", "fastapi-nosleep", "wrk", "rps")
    if gw is not None:
        # Saturation ratios use wrk: on one core it generates more load than
        # shoal-load (~75k req/s), which the bare server can exceed.
        r, r_own = ratio(gw_wrk, bare_wrk), ratio(gw, bare)
        add(
            "gateway GET / throughput vs bare axum",
            f"wrk: {fmt(gw_wrk)} vs {fmt(bare_wrk)} req/s = {fmt(100 * r if r else None, 1)} % "
            f"(shoal-load: {fmt(gw)} vs {fmt(bare)} = {fmt(100 * r_own if r_own else None, 1)} %)",
            "≥ 70 %",
            r is not None and r >= 0.70,
        )
        r, r_own = ratio(gw_wrk, fa_wrk), ratio(gw, fa)
        add(
            "gateway GET / throughput vs FastAPI",
            f"wrk: {fmt(gw_wrk)} vs {fmt(fa_wrk)} req/s = {fmt(r, 1)}× (shoal-load: {fmt(r_own, 1)}×)",
            "≈ 45×",
            None if r is None else r >= 45,
        )
        open_rates = sorted(
            (int(name.split("-")[1]), name)
            for name in (results.get("gateway") or {})
            if name.startswith("open-") and get(results, "gateway", name, "gateway", "load")
        )
        if open_rates:
            rate, name = open_rates[-1]
            p99 = med(results, "gateway", name, "gateway", "load", "p99_ms")
            add(f"gateway GET / p99, open loop at {rate:,} req/s", f"{fmt(p99, 2)} ms", "≤ 3 ms", p99 <= 3.0)
        p99 = med(results, "gateway", "saturation", "gateway", "load", "p99_ms")
        add(
            "gateway GET / p99, closed loop at saturation",
            f"{fmt(p99, 2)} ms ({meta.get('sat_conns', '?')} connections; FastAPI: {fmt(med(results, 'gateway', 'saturation', 'fastapi-nosleep', 'load', 'p99_ms'), 1)} ms)",
            "≤ 3 ms",
            p99 is not None and p99 <= 3.0,
        )
    for name in sorted(results.get("concurrency") or {}, key=conc_key):
        n, burst = conc_key(name)
        for server in ("gateway", "fastapi"):
            node = get(results, "concurrency", name, server, "load")
            if not node:
                continue
            pct = 100 * node["achieved_rps"]["median"] / n
            timeouts = node["timeouts"]["max"]
            errors = node["errors"]["max"]
            unfinished = node["unfinished"]["max"]
            add(
                f"{n:,} concurrent 1-second requests{' (synchronized burst)' if burst else ''}: "
                f"{'Shoal' if server == 'gateway' else 'FastAPI'}",
                f"{fmt(pct, 1)} % of ideal, p99 {fmt(node['p99_ms']['median'], 0)} ms, "
                f"{timeouts} timeouts, {errors} errors, {unfinished} unfinished (worst run)",
                "≥ 99 %, 0 timeouts" if server == "gateway" and not burst else "–",
                (pct >= 99 and timeouts == 0 and errors == 0 and unfinished == 0)
                if server == "gateway" and not burst
                else None,
            )
    via = med(results, "hop", "half-load", "via-gateway", "load", "p99_ms")
    direct = med(results, "hop", "half-load", "direct-grpc", "load", "p99_ms")
    if via is not None and direct is not None:
        add(
            f"p99 added by the gateway hop at {meta.get('hop_rate', '?')} req/s (half of its saturation)",
            f"{fmt(via - direct, 3)} ms ({fmt(via, 3)} via gateway − {fmt(direct, 3)} direct)",
            "≤ 0.5 ms",
            via - direct <= 0.5,
        )
    for service in ("gateway", "worker", "aggregator"):
        rss = get(results, "footprint", "rss", service, "rss")
        if rss:
            add(f"idle RSS, {service}", f"{fmt(rss['idle_kib'] / 1024, 1)} MiB", "≤ 10 MB", rss["idle_kib"] * 1024 <= 10e6)
        st = get(results, "footprint", "startup", service, "startup")
        if st:
            add(f"exec to ready, {service}", f"{fmt(st['ready_ms_median'], 1)} ms (median)", "≤ 50 ms", st["ready_ms_median"] <= 50)
    images = get(results, "footprint", "images", "docker", "images")
    if images is not None:
        shoal = [i for i in images.get("images") or [] if not i["image"].endswith(":<none>")]
        sizes = [docker_size_mb(i["size"]) for i in shoal]
        add(
            "image size (`docker image ls`, images built by the repository's scripts)",
            ", ".join(f"{i['image']} {i['size']}" for i in shoal) or "no shoal images on this machine",
            "≤ 20 MB",
            all(s is not None and s <= 20 for s in sizes) if sizes else None,
        )
    return rows


def docker_size_mb(text):
    """`11.6MB`, `940kB`, `1.65GB` (docker's decimal units) -> MB."""
    for unit, factor in (("GB", 1e3), ("MB", 1.0), ("kB", 1e-3), ("B", 1e-6)):
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * factor
            except ValueError:
                return None
    return None


def conc_key(name):
    """`c1000` (steady, ramped) or `burst-c1000` -> (1000, burst?)."""
    return int(name.split("c")[-1]), name.startswith("burst-")


def markdown(results, meta, rows):
    md = []
    if meta.get("mode") == "quick":
        md.append("**Smoke run** (`--quick`): tiny loads on a debug build, proving the script works; "
                  "these figures are not measurements.\n")
    md.append(f"Command: `{meta.get('command', 'scripts/bench')}` — mode {meta.get('mode')}, profile {meta.get('profile')}, "
              f"{meta.get('runs')} repeat(s), medians with (min–max).\n")
    md.append(f"Machine: {meta.get('nproc')} CPUs, {meta.get('cpu')}, {meta.get('kernel')}; pinning: {meta.get('pinning')}; "
              f"open files: {meta.get('nofile')}.  ")
    md.append(f"Load average before/after: {meta.get('load_before')} / {meta.get('load_after')}; commit {meta.get('commit')}; "
              f"{meta.get('date')}; took {meta.get('elapsed_s')} s.  ")
    per_section = [
        f"{k[len('load_before_'):]}: {meta[k].split(';')[0]} → {meta.get('load_after_' + k[len('load_before_'):], '?').split(';')[0]}"
        f" (rustc processes {meta[k].split(': ')[-1]} → {meta.get('load_after_' + k[len('load_before_'):], '?').split(': ')[-1]})"
        for k in meta
        if k.startswith("load_before_")
    ]
    if per_section:
        md.append(f"Load average per section, before → after: {'; '.join(per_section)}.  ")
    if meta.get("fastapi"):
        md.append(f"FastAPI baseline: {meta['fastapi']}\n")

    md.append("\n### Against the targets\n")
    md.append("| what | measured | target | met |\n|---|---|---|---|")
    for r in rows:
        met = {True: "yes", False: "**no**", None: "–"}[r["met"]]
        md.append(f"| {r['what']} | {r['measured']} | {r['target']} | {met} |")

    g = results.get("gateway")
    if g:
        md.append("\n### gateway `GET /` (no delay): closed-loop saturation\n")
        md.append("| server | req/s (shoal-load) | req/s (wrk) | p50 ms (shoal-load) | p99 ms (shoal-load) | p99 ms (wrk) | errors | vs bare axum (wrk) | vs FastAPI (wrk) |")
        md.append("|---|---|---|---|---|---|---|---|---|")
        bare = med(results, "gateway", "wrk", "bare", "wrk", "rps")
        fa = med(results, "gateway", "wrk", "fastapi-nosleep", "wrk", "rps")
        for server, label in (("gateway", "shoal-gateway"), ("bare", "bare axum"), ("fastapi-nosleep", "FastAPI (no sleep)")):
            node = get(g, "saturation", server, "load")
            if not node:
                continue
            w = get(g, "wrk", server, "wrk")
            rps = w["rps"]["median"] if w else None
            md.append(
                f"| {label} | {fmt_spread(node['achieved_rps'])} | {fmt_spread(w['rps']) if w else '–'} | "
                f"{fmt(node['p50_ms']['median'], 2)} | {fmt(node['p99_ms']['median'], 2)} | "
                f"{fmt(w['p99_ms']['median'], 2) if w and w.get('p99_ms') else '–'} | "
                f"{node['errors']['max'] + (w['errors']['max'] + w['timeouts']['max'] + w['non_2xx']['max'] if w else 0)} | "
                f"{fmt(100 * ratio(rps, bare), 1) if bare else '–'} % | {fmt(ratio(rps, fa), 1) if fa else '–'}× |"
            )
        md.append("\n### gateway `GET /`: open loop at fixed rates (latency from the intended send time)\n")
        md.append("| rate req/s | server | achieved | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors+timeouts | generator lag p99 ms |")
        md.append("|---|---|---|---|---|---|---|---|---|---|")
        for name in sorted((n for n in g if n.startswith("open-")), key=lambda n: int(n.split("-")[1])):
            for server in ("gateway", "bare", "fastapi-nosleep"):
                node = get(g, name, server, "load")
                skip = get(g, name, server, "skip")
                if skip:
                    md.append(f"| {name[5:]} | {server} | skipped: {skip['skipped']} | | | | | | | |")
                if not node:
                    continue
                md.append(
                    f"| {int(name[5:]):,} | {server} | {fmt(node['achieved_rps']['median'])} | {fmt_spread(node['p50_ms'], 3)} | "
                    f"{fmt(node['p90_ms']['median'], 3)} | {fmt_spread(node['p99_ms'], 3)} | {fmt(node['p999_ms']['median'], 3)} | "
                    f"{fmt(node['max_ms']['median'], 2)} | {node['errors']['max'] + node['timeouts']['max']} | "
                    f"{fmt(node['generator_lag_p99_ms']['median'], 3)} |"
                )

    c = results.get("concurrency")
    if c:
        md.append(
            f"\n### N concurrent clients of a one-second endpoint ({meta.get('conc_rounds')} requests each, "
            f"timeout {meta.get('conc_timeout')}; steady: first requests spread over {meta.get('conc_ramp')}; "
            "burst: all at once)\n"
        )
        md.append("| N | start | server | requests | achieved req/s | % of ideal (N req/s) | p50 ms | p99 ms | max ms | errors | timeouts | unfinished |")
        md.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name in sorted(c, key=conc_key):
            n, burst = conc_key(name)
            for server in ("gateway", "fastapi"):
                node = get(c, name, server, "load")
                if not node:
                    continue
                pct = {k: 100 * v / n for k, v in node["achieved_rps"].items() if k != "n"} | {"n": node["achieved_rps"]["n"]}
                md.append(
                    f"| {n:,} | {'burst' if burst else 'steady'} | {server} | {fmt(node['sent']['median'])} | {fmt_spread(node['achieved_rps'])} | {fmt_spread(pct, 1)} | "
                    f"{fmt(node['p50_ms']['median'], 1)} | {fmt_spread(node['p99_ms'], 1)} | {fmt(node['max_ms']['median'], 1)} | "
                    f"{node['errors']['max']} | {node['timeouts']['max']} | {node['unfinished']['max']} |"
                )
        kinds = merge_counts(get(c, name, s, "load")["error_kinds"] for name in c for s in c[name] if get(c, name, s, "load"))
        if kinds:
            md.append(f"\nError kinds (all runs): {', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))}")

    h = results.get("hop")
    if h:
        md.append(f"\n### the gateway hop (echo task), open loop at {meta.get('hop_rate')} req/s\n")
        md.append("| path | saturation req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors+timeouts |")
        md.append("|---|---|---|---|---|---|---|")
        for server, label in (("via-gateway", "client → gateway (HTTP) → worker (gRPC)"), ("direct-grpc", "client → worker (gRPC)")):
            sat = get(h, "saturation", server, "load")
            node = get(h, "half-load", server, "load")
            if not node:
                continue
            md.append(
                f"| {label} | {fmt_spread(sat['achieved_rps']) if sat else '–'} | {fmt_spread(node['p50_ms'], 3)} | "
                f"{fmt(node['p90_ms']['median'], 3)} | {fmt_spread(node['p99_ms'], 3)} | {fmt(node['p999_ms']['median'], 3)} | "
                f"{node['errors']['max'] + node['timeouts']['max']} |"
            )

    f = results.get("footprint")
    if f:
        md.append("\n### footprint\n")
        md.append("| service | binary | exec → ready ms (median, min–max) | exec → `listening` log ms | RSS at ready | RSS idle (1 s) | RSS after burst | peak RSS | SIGTERM → exit ms |")
        md.append("|---|---|---|---|---|---|---|---|---|")
        names = {"gateway": "shoal-gateway", "worker": "shoal-worker", "aggregator": "shoal-metrics-aggregator", "bare": "bare-hello"}
        for service in ("gateway", "worker", "aggregator", "bare", "fastapi"):
            size = get(f, "binary", names.get(service, ""), "size")
            st = get(f, "startup", service, "startup")
            rss = get(f, "rss", service, "rss") or get(f, "rss", f"{service}-nosleep", "rss")
            if not (size or st or rss):
                continue
            ready = [r["ready_ms"] for r in st["runs"]] if st else []
            mib = lambda kib: f"{kib / 1024:.1f} MiB" if kib is not None else "–"
            md.append(
                f"| {service} | {fmt(size['bytes'] / 2**20, 1) + ' MiB' if size else '–'} | "
                f"{fmt(st['ready_ms_median'], 1) if st else '–'}{f' ({min(ready):.1f}–{max(ready):.1f})' if len(ready) > 1 else ''} | "
                f"{fmt(st['listening_log_ms_median'], 1) if st else '–'} | "
                f"{mib(st['rss_at_ready_kib_median']) if st else '–'} | {mib(rss['idle_kib']) if rss else '–'} | "
                f"{mib(rss['after_burst_kib']) if rss and rss['burst'] else '– (no burst)'} | {mib(rss['peak_kib']) if rss else '–'} | "
                f"{fmt(st['exit_ms_median'], 1) if st else '–'} |"
            )
    return "\n".join(md) + "\n"


def main():
    raw, results_path, summary_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    meta, groups = load_raw(raw)
    results = aggregate(groups)
    rows = comparisons(results, meta)
    results_path.write_text(json.dumps({"meta": meta, "targets": rows, "results": results}, indent=1) + "\n")
    summary_path.write_text(markdown(results, meta, rows))


if __name__ == "__main__":
    main()

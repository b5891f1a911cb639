"""Groups `perf report --no-children --sort dso,symbol --stdio -g none` output
(stdin) into coarse buckets, so "where does the time go" has a short answer.
A symbol goes to the first bucket whose pattern it contains."""

import re
import sys
from collections import defaultdict

BUCKETS = [
    ("kernel: netfilter/conntrack", ["nf_", "ipt_", "conntrack", "iptable"]),
    ("kernel: TCP/IP loopback", ["tcp_", "ip_", "__ip", "ip6", "net_", "__net", "skb", "sock", "inet", "__dev", "dev_", "loopback", "napi", "__napi", "sk_", "__sk", "dst_", "neigh", "__tcp", "__inet", "lock_sock", "release_sock"]),
    ("kernel: epoll/syscalls/scheduler/other", ["[k]"]),
    ("tracing + opentelemetry (spans, context)", ["tracing", "opentelemetry", "sharded_slab", "Span", "span"]),
    ("metrics", ["metrics", "Histogram", "Counter", "prometheus"]),
    ("allocator", ["malloc", "free", "_int_", "realloc", "calloc", "cfree", "alloc::"]),
    ("formatting", ["core::fmt", "fmt::"]),
    ("hyper/http (HTTP/1.1 parse + encode)", ["hyper", "httparse", "http::", "h2::"]),
    ("tonic/prost (gRPC)", ["tonic", "prost"]),
    ("axum/tower routing + layers", ["axum", "tower", "matchit"]),
    ("tokio runtime + timers", ["tokio", "mio", "clock_gettime", "epoll"]),
    ("libc other (memcpy, syscalls)", ["libc", "mem", "__vdso", "pthread"]),
]


def main():
    totals = defaultdict(float)
    top = defaultdict(list)
    for line in sys.stdin:
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[([k.])\]\s+(.*?)\s*$", line)
        if not m:
            continue
        pct, dso, kind, symbol = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        symbol = re.split(r"\s{2,}", symbol)[0]
        text = f"[{kind}] {dso} {symbol}"
        for name, patterns in BUCKETS:
            if any(p in text for p in patterns):
                break
        else:
            name = "other user code"
        totals[name] += pct
        top[name].append((pct, symbol[:90]))
    for name, pct in sorted(totals.items(), key=lambda kv: -kv[1]):
        heads = ", ".join(f"{s} {p:.1f}%" for p, s in sorted(top[name], reverse=True)[:3])
        print(f"{pct:6.1f}%  {name:<44} e.g. {heads}")


if __name__ == "__main__":
    main()

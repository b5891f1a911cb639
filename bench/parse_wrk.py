"""Turns wrk's text report (stdin, run with --latency) into JSON (stdout)."""

import json
import re
import sys

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def ms(text):
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * UNITS[unit]


def main():
    text = sys.stdin.read()
    out = {"rps": 0.0, "requests": 0, "errors": 0, "timeouts": 0, "non_2xx": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["rps"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in ([\d.]+\w+)", text):
        out["requests"] = int(m.group(1))
        out["window_s"] = ms(m.group(2)) / 1e3
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        connect, read, write, timeout = map(int, m.groups())
        out["errors"] = connect + read + write
        out["timeouts"] = timeout
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non_2xx"] = int(m.group(1))
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)\s*$", text, re.M):
        out[f"p{pct}_ms"] = ms(value)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()

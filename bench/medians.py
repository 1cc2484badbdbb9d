"""The medians of bench/run's rounds: read NAME|req/s p50 p99 p99.9 errors
lines, print one table row per target, and return the medians by name."""

import statistics


def medians(path):
    rows = {}
    for line in open(path):
        name, values = line.rstrip("\n").split("|")
        rows.setdefault(name, []).append([float(v) for v in values.split()])
    med = {n: [statistics.median(col) for col in zip(*r)] for n, r in rows.items()}
    print("\n   median of rounds                          req/s     p50 ms   p99 ms  p99.9 ms  errors")
    for name, (rps, p50, p99, p999, errors) in med.items():
        print(f"   {name:<40} {rps:>8.0f} {p50:>9.2f} {p99:>8.2f} {p999:>9.2f} {errors:>7.0f}")
    return med

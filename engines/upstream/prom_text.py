"""A minimal reader of the Prometheus text exposition format, for workers' `/metrics`.

Owns: summing the samples of chosen metric families across their label sets. It does not
own histograms' structure, exemplars, or timestamps (ignored), nor any of the gateway's own
metrics (prometheus-client writes those).

Hand-written rather than `prometheus_client.parser.text_string_to_metric_families`: that
parser builds a Metric object per family and a Sample per line with its labels parsed,
while the engines only need a handful of sums, scraped every few seconds from every worker;
this reader skips every line that does not start with the wanted prefix and never looks at
labels.
"""

from __future__ import annotations

__all__ = ["sum_samples"]


def sum_samples(text: str, prefix: str | tuple[str, ...] = "") -> dict[str, float]:
    """{metric name: sum of its samples over all label sets} for names starting with
    `prefix` (or any of several; all names when empty). Malformed lines are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(prefix):
            continue
        brace = line.find("{")
        if brace >= 0:
            name = line[:brace]
            rest = line[line.rfind("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        value = rest.split(None, 1)
        if not value:
            continue
        try:
            v = float(value[0])
        except ValueError:
            continue
        out[name.strip()] = out.get(name.strip(), 0.0) + v
    return out

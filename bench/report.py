"""Plain-text tables and the issue's target checks, from the result document."""
from __future__ import annotations

from typing import Any

MIB_SIZES = (17_941_067, 64 * 1024 * 1024)


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "-|-".join("-" * w for w in widths)
    body = [" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]
    return "\n".join([line, sep, *body])


def http_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for row in rows:
        k = row["targets"].get("kura", {}).get("median", {})
        n = row["targets"].get("nginx", {}).get("median", {})
        out.append([
            f"{row['method']} {row['size']} c={row['concurrency']}",
            _f(k.get("requests_per_s")), _f(k.get("mib_per_s")),
            f"{_f(k.get('p50_ms'), 2)}/{_f(k.get('p99_ms'), 2)}",
            _f(k.get("server_cpu_ms_per_request"), 3), _f(k.get("server_cpu_s_per_gib"), 2),
            _f(n.get("requests_per_s")), _f(n.get("mib_per_s")),
            f"{_f(n.get('p50_ms'), 2)}/{_f(n.get('p99_ms'), 2)}",
            _f(n.get("server_cpu_ms_per_request"), 3), _f(n.get("server_cpu_s_per_gib"), 2),
            _f(row.get("ratio_throughput"), 2),
            f"{k.get('errors', '-')}/{n.get('errors', '-')}",
        ])
    return _table(["cell", "kura req/s", "kura MiB/s", "kura p50/p99 ms", "kura CPU ms/req",
                   "kura CPU s/GiB", "nginx req/s", "nginx MiB/s", "nginx p50/p99 ms",
                   "nginx CPU ms/req", "nginx CPU s/GiB", "kura÷nginx", "errors k/n"], out)


def h2_table(rows: list[dict[str, Any]]) -> str:
    out = []
    names = ("kura-h2", "nginx-h2", "kura-h1")
    for row in rows:
        cells = [f"GET {row['size_bytes']:,} B x{row['in_flight']}"]
        for name in names:
            m = row["targets"].get(name, {}).get("median", {})
            cells += [_f(m.get("requests_per_s")), _f(m.get("mib_per_s")),
                      f"{_f(m.get('p50_ms'), 2)}/{_f(m.get('p99_ms'), 2)}",
                      _f(m.get("server_cpu_ms_per_request"), 3)]
        cells += [_f(row.get("ratio_throughput_vs_nginx-h2"), 2),
                  _f(row.get("ratio_throughput_vs_kura-h1"), 2),
                  "/".join(str(row["targets"].get(n, {}).get("median", {}).get("errors", "-"))
                           for n in names)]
        out.append(cells)
    headers = ["cell"]
    for name in names:
        headers += [f"{name} req/s", f"{name} MiB/s", f"{name} p50/p99 ms", f"{name} CPU ms/req"]
    return _table(headers + ["kura-h2÷nginx-h2", "kura-h2÷kura-h1", "errors"], out)


def reapi_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for row in rows:
        k = row["targets"].get("kura", {}).get("median", {})
        b = row["targets"].get("buildgrid", {}).get("median", {})
        out.append([
            f"{row['operation']} c={row['concurrency']}",
            _f(k.get("calls_per_s")), _f(k.get("mib_per_s")),
            f"{_f(k.get('p50_ms'), 2)}/{_f(k.get('p99_ms'), 2)}", _f(k.get("server_cpu_ms_per_call"), 2),
            _f(b.get("calls_per_s")), _f(b.get("mib_per_s")),
            f"{_f(b.get('p50_ms'), 2)}/{_f(b.get('p99_ms'), 2)}", _f(b.get("server_cpu_ms_per_call"), 2),
            _f(row.get("ratio_throughput"), 2), f"{k.get('errors', '-')}/{b.get('errors', '-')}",
        ])
    return _table(["operation", "kura calls/s", "kura MiB/s", "kura p50/p99 ms", "kura CPU ms/call",
                   "BuildGrid calls/s", "BuildGrid MiB/s", "BuildGrid p50/p99 ms",
                   "BuildGrid CPU ms/call", "kura÷BuildGrid", "errors k/b"], out)


def memory_table(mem: dict[str, Any]) -> str:
    rows = []
    for name in ("upload", "download"):
        part = mem[name]
        rows.append([f"{mem['body_bytes'] / 1024 ** 3:.2f} GiB {name}", _f(part["max_growth_mib"]),
                     _f(part["mib_per_s"]), str(part["samples"]), str(part["errors"])])
    return _table(["transfer", "max worker RSS growth MiB", "MiB/s", "RSS samples", "errors"], rows)


def startup_table(rows: list[dict[str, Any]]) -> str:
    return _table(["stored artifacts", "seed s", "spawn→/up 200 s", "spawn→first GET 200 s"],
                  [[f"{r['artifacts']:,}", _f(r["seed_seconds"]), _f(r["up_s"], 2),
                    _f(r["first_get_s"], 2)] for r in rows])


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _reapi_cpu_ratio(row: dict[str, Any]) -> float | None:
    kura = row["targets"].get("kura", {}).get("median", {}).get("server_cpu_ms_per_call")
    ref = row["targets"].get("buildgrid", {}).get("median", {}).get("server_cpu_ms_per_call")
    return kura / ref if kura is not None and ref else None


def _cpu_note(cpu_ratio: float | None) -> str:
    return f" (server CPU per op {cpu_ratio:.2f} x)" if cpu_ratio is not None else ""


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure it was judged on."""
    checks: list[dict[str, Any]] = []
    http = [r for r in doc.get("http", []) if r.get("ratio_throughput") is not None]
    for row in http:
        if row["method"] == "GET" and row["size_bytes"] in MIB_SIZES:
            r = row["ratio_throughput"]
            checks.append({"target": f"GET {row['size']} c={row['concurrency']} >= 0.9 x nginx",
                           "figure": f"{r:.2f} x{_cpu_note(row.get('ratio_cpu_per_request'))}",
                           "verdict": _verdict(r >= 0.9)})
        if row["method"] == "PUT" and row["size_bytes"] == 64 * 1024 * 1024 and row["concurrency"] == 8:
            r = row["ratio_throughput"]
            checks.append({"target": "PUT 64 MiB c=8 >= 0.7 x nginx WebDAV",
                           "figure": f"{r:.2f} x{_cpu_note(row.get('ratio_cpu_per_request'))}",
                           "verdict": _verdict(r >= 0.7)})
    for row in doc.get("http", []):
        if row["size_bytes"] != 4096 or row["concurrency"] != 8:
            continue
        kura = row["targets"].get("kura", {}).get("median", {})
        r = row.get("ratio_throughput")
        ratio = f"{r:.2f} x{_cpu_note(row.get('ratio_cpu_per_request'))}" if r is not None else "-"
        if row["method"] == "GET":
            rps, p99 = kura.get("requests_per_s"), kura.get("p99_ms")
            checks.append({"target": "GET 4 KiB c=8 >= 12,000 req/s",
                           "figure": f"{rps:,.0f} req/s" if rps else "-",
                           "verdict": _verdict(rps >= 12_000 if rps else None)})
            checks.append({"target": "GET 4 KiB c=8 >= 0.35 x nginx", "figure": ratio,
                           "verdict": _verdict(r >= 0.35 if r is not None else None)})
            checks.append({"target": "GET 4 KiB c=8 p99 <= 5 ms",
                           "figure": f"{p99:.2f} ms" if p99 is not None else "-",
                           "verdict": _verdict(p99 <= 5 if p99 is not None else None)})
        if row["method"] == "PUT":
            checks.append({"target": "PUT 4 KiB c=8 (fdatasync'ed) >= 0.6 x nginx WebDAV",
                           "figure": ratio, "verdict": _verdict(r >= 0.6 if r is not None else None)})
    # Issue 13's REAPI targets (GetActionResult at c=8 only; the others at every concurrency).
    wanted = {("GetActionResult", 8): 3.0, "FindMissingBlobs(1000)": 3.0,
              "BatchUpdateBlobs(1000x4KiB)": 2.0, "BatchReadBlobs(1000x4KiB)": 2.0,
              "ByteStream.Read(64MiB)": 2.0, "ByteStream.Write(64MiB)": 2.0}
    for row in doc.get("reapi", []):
        need = wanted.get((row["operation"], row["concurrency"]), wanted.get(row["operation"]))
        if need is None:
            continue
        r = row.get("ratio_throughput")
        checks.append({"target": f"{row['operation']} c={row['concurrency']} >= {need:g} x BuildGrid",
                       "figure": (f"{r:.2f} x{_cpu_note(_reapi_cpu_ratio(row))}"
                                  if r is not None else "-"),
                       "verdict": _verdict(r >= need if r is not None else None)})
    mem = doc.get("memory")
    if mem:
        for name in ("upload", "download"):
            growth = mem[name]["max_growth_mib"]
            checks.append({"target": f"worker RSS growth <= 50 MiB, {mem['size_gib']:.2f} GiB {name}",
                           "figure": f"{growth:.1f} MiB" if growth is not None else "-",
                           "verdict": _verdict(growth <= 50 if growth is not None else None)})
    start = [r for r in doc.get("startup", []) if r.get("up_s") is not None]
    if len(start) >= 2:
        base, top = start[0], start[-1]
        slower = top["up_s"] - base["up_s"]
        get_slower = (top["first_get_s"] or 0) - (start[1]["first_get_s"] or 0) if len(start) > 2 else None
        # "Independent" within noise: the largest store starts no more than 1 s (or 50 %) later.
        ok = slower <= max(1.0, 0.5 * base["up_s"])
        figure = (f"/up {base['up_s']:.2f} s at {base['artifacts']:,} vs {top['up_s']:.2f} s at "
                  f"{top['artifacts']:,}")
        if get_slower is not None:
            figure += f"; first GET {start[1]['first_get_s']:.2f} s vs {top['first_get_s']:.2f} s"
        checks.append({"target": "start-up independent of artifact count", "figure": figure,
                       "verdict": _verdict(ok)})
    return checks


def targets_table(checks: list[dict[str, Any]]) -> str:
    return _table(["target", "figure", "verdict"],
                  [[c["target"], c["figure"], c["verdict"]] for c in checks])


def render(doc: dict[str, Any]) -> str:
    parts = []
    if doc.get("http"):
        parts += ["HTTP (medians; kura-py Nx route /v1/cache/{hash} vs nginx sendfile / WebDAV PUT)",
                  http_table(doc["http"])]
    if doc.get("http2"):
        parts += ["", "HTTP/2 (medians; h2load, 64 requests in flight: h2 on one connection, "
                  "HTTP/1.1 on 64 connections)", h2_table(doc["http2"])]
    if doc.get("reapi"):
        parts += ["", "REAPI (medians)", reapi_table(doc["reapi"])]
    if doc.get("memory"):
        parts += ["", "Memory (kura-py HTTP workers)", memory_table(doc["memory"])]
    if doc.get("startup"):
        parts += ["", "Start-up", startup_table(doc["startup"])]
    if doc.get("targets"):
        parts += ["", "Issue targets", targets_table(doc["targets"])]
    for note in doc.get("notes", []):
        parts.append(f"note: {note}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report FILE``: print the tables of a saved run, targets re-evaluated."""
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415

    args = sys.argv[1:] if argv is None else argv
    with open(args[0] if args else "bench/results/latest.json") as fh:
        doc = json.load(fh)
    doc["targets"] = evaluate_targets(doc)
    print(render(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

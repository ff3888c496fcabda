"""One table of benchmarks/gpu_check.sh's results: each row's images/s and peak memory as a ratio
to the published step's at the same architecture and batch, measured in the same device call.

    python3 benchmarks/gpu_table.py PUBLISHED_JSON STEP_JSON... [--loss LOSS_JSON...] [--out OUT_JSON] [--md OUT_MD]

PUBLISHED_JSON is what the published step's benchmark writes ($PUBLISHED_DIR/bench_published_step.py, see gpu_check.sh) (rows: impl seed = the
published step, lean = a timm bf16 backbone step without memory or loss); STEP_JSON what
benchmarks/bench_step.py writes (any engine: deepspeed rows included); LOSS_JSON what
benchmarks/bench_memory.py --device cuda writes (the loss path alone, shown as a share of the
massl single-engine step at the same batch). A missing or failed part gives no rows, never a crash.
"""
from __future__ import annotations

import argparse
import json
import os


def _load(path: str):
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_rows(published: dict | None, steps: list[dict], losses: list[dict]) -> list[dict]:
    """Rows of the table: the published and lean references, massl's settings, the loss path."""
    refs = {}
    rows = []
    for r in (published or {}).get("rows", []):
        name = {"seed": "published step", "lean": "timm bf16 backbone+head only"}.get(r.get("impl"), r.get("impl"))
        row = {"arch": r["arch"], "batch": r["bs"], "what": name}
        if r.get("ok"):
            row.update(img_per_s=r["img_s"], peak_gib=r["peak_gib"], mfu=r.get("mfu"), step_ms=1000 * r["step_s"])
            if r.get("impl") == "seed":
                refs[(r["arch"], r["bs"])] = row
        else:
            row["error"] = r.get("err", "failed")
        rows.append(row)
    singles = {}
    for result in steps:
        for r in result.get("rows", []):
            what = (f"massl {r['engine']}, AC {r['activation_checkpointing']}"
                    f"{', compiled' if r.get('compile') else ''}{', ' + r['precision'] if r.get('precision') else ''}")
            row = {"arch": r["arch"], "batch": r["batch"], "what": what}
            if "error" in r:
                row["error"] = r["error"]
            else:
                row.update(img_per_s=r["img_per_s"], peak_gib=r["peak_gib"], mfu=r.get("mfu"), step_ms=r["step_ms"])
                if r["engine"] == "single" and r["activation_checkpointing"] == "none" and not r.get("compile"):
                    singles.setdefault(r["batch"], row)
            rows.append(row)
    for result in losses:
        for r in result.get("rows", []):
            if r.get("world") != 1 or r.get("chunk_rows"):
                continue
            batch = result["settings"]["batch"]
            row = {"arch": "-", "batch": batch, "what": "loss path alone (perm + loss fwd/bwd + enqueue)",
                   "step_ms": r["ms"]}
            step = singles.get(batch)
            if step:
                row["share_of_step"] = r["ms"] / step["step_ms"]
            rows.append(row)
    for row in rows:
        ref = refs.get((row["arch"], row["batch"]))
        if ref and "img_per_s" in row:
            row["speed_vs_published"] = row["img_per_s"] / ref["img_per_s"]
            row["memory_vs_published"] = row["peak_gib"] / ref["peak_gib"]
    return rows


def table(rows: list[dict]) -> str:
    def f(row, key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "-"

    lines = ["| arch | batch | what | img/s | step ms | peak GiB | MFU | x published img/s | x published GiB |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['batch']} | {r['what']} | {r['error'][:80]} | | | | | |")
            continue
        step = f(r, "step_ms", ".1f") + (f" ({100 * r['share_of_step']:.1f}% of the step)" if "share_of_step" in r else "")
        lines.append(f"| {r['arch']} | {r['batch']} | {r['what']} | {f(r, 'img_per_s', '.1f')} | {step} | "
                     f"{f(r, 'peak_gib', '.2f')} | {f(r, 'mfu', '.3f')} | {f(r, 'speed_vs_published', '.2f')} | "
                     f"{f(r, 'memory_vs_published', '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("published")
    p.add_argument("steps", nargs="*")
    p.add_argument("--loss", nargs="*", default=[])
    p.add_argument("--out", help="JSON of the rows and the inputs' devices")
    p.add_argument("--md", help="the table as markdown")
    args = p.parse_args(argv)
    published = _load(args.published)
    steps = [s for s in map(_load, args.steps) if s]
    losses = [s for s in map(_load, args.loss) if s]
    rows = build_rows(published, steps, losses)
    devices = sorted({d for d in [(published or {}).get("device")] + [s.get("device") for s in steps] if d})
    text = f"devices: {', '.join(devices) or 'unknown'}\n" + table(rows)
    print(text)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(text + "\n")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"devices": devices, "published": published, "steps": steps, "loss_path": losses, "rows": rows},
                      fh, indent=1)
    return rows


if __name__ == "__main__":
    main()

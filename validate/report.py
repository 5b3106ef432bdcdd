"""The gate's thresholds, the versioned JSON report (schema in REPORT_SCHEMA, documented in docs/report-schema.md),
its Markdown summary and its PNG plots (per-layer drift, KL histogram).

    report = build_report(comparison, thresholds)   # a dict matching REPORT_SCHEMA
    paths = write_report(report, comparison, "report.json", force=False)
        -> report.json, report.md, report-kld.png, report-layers.png (the last only with per-layer drift)
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nextq import __version__
from nextq.errors import NextqError, OutputExistsError

from .compare import Comparison, kld_histogram

REPORT_FORMAT = "nextq-validate-report"
REPORT_VERSION = 1


@dataclass(frozen=True)
class Thresholds:
    """The gate. max_ppl_increase: allowed relative perplexity increase (0.02 = 2 %); max_kld: mean KL in nats;
    min_top1: minimum top-1 agreement (fraction)."""

    max_ppl_increase: float = 0.02
    max_kld: float = 0.02
    min_top1: float = 0.90

    def __post_init__(self):
        if self.max_ppl_increase < 0:
            raise ValueError(f"max_ppl_increase: expected >= 0, got {self.max_ppl_increase}")
        if self.max_kld < 0:
            raise ValueError(f"max_kld: expected >= 0, got {self.max_kld}")
        if not 0 <= self.min_top1 <= 1:
            raise ValueError(f"min_top1: expected in [0, 1], got {self.min_top1}")


def parse_fraction(text: str | float) -> float:
    """'2%' -> 0.02, '0.02' -> 0.02."""
    s = str(text).strip()
    try:
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"expected a number or a percentage like '2%', got {text!r}") from None


def checks(m: dict[str, float], t: Thresholds) -> list[dict[str, Any]]:
    """One entry per threshold: name, measured value, limit, comparison, passed."""
    rows = [("ppl_increase", m["ppl_increase"], "<=", t.max_ppl_increase),
            ("kld_mean", m["kld_mean"], "<=", t.max_kld),
            ("top1", m["top1"], ">=", t.min_top1)]
    return [{"name": n, "value": v, "op": op, "limit": lim, "passed": bool(v <= lim if op == "<=" else v >= lim)}
            for n, v, op, lim in rows]


# ---- schema --------------------------------------------------------------------------------------------------
# A JSON-Schema subset (type, required, properties, items, enum, const, minimum); `validate_doc` checks it.

_NUM = {"type": "number"}
_NUM0 = {"type": "number", "minimum": 0}
_MODEL = {"type": "object", "required": ["path", "backend"],
          "properties": {"path": {"type": "string"}, "backend": {"type": "string"}}}
REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "version", "nextq_version", "created", "passed", "candidate", "reference", "corpus",
                 "metrics", "thresholds", "checks", "kld_histogram", "layers", "cache", "timing", "files"],
    "properties": {
        "format": {"const": REPORT_FORMAT},
        "version": {"const": REPORT_VERSION},
        "nextq_version": {"type": "string"},
        "created": {"type": "string"},
        "passed": {"type": "boolean"},
        "candidate": _MODEL,
        "reference": _MODEL,
        "corpus": {"type": "object",
                   "required": ["name", "sha256", "tokens", "window", "stride", "windows", "scored_tokens"],
                   "properties": {"name": {"type": "string"}, "sha256": {"type": "string"},
                                  "tokens": {"type": "integer", "minimum": 2},
                                  "window": {"type": "integer", "minimum": 2},
                                  "stride": {"type": "integer", "minimum": 1},
                                  "windows": {"type": "integer", "minimum": 1},
                                  "scored_tokens": {"type": "integer", "minimum": 1}}},
        "metrics": {"type": "object",
                    "required": ["ppl_reference", "ppl_candidate", "ppl_ratio", "ppl_increase", "kld_mean",
                                 "kld_p99", "kld_max", "top1", "logit_err_max", "logit_err_mean", "positions"],
                    "properties": {"ppl_reference": _NUM0, "ppl_candidate": _NUM0, "ppl_ratio": _NUM0,
                                   "ppl_increase": _NUM, "kld_mean": _NUM0, "kld_p99": _NUM0, "kld_max": _NUM0,
                                   "top1": {"type": "number", "minimum": 0, "maximum": 1},
                                   "logit_err_max": _NUM0, "logit_err_mean": _NUM0,
                                   "positions": {"type": "integer", "minimum": 1}}},
        "thresholds": {"type": "object", "required": ["max_ppl_increase", "max_kld", "min_top1"],
                       "properties": {"max_ppl_increase": _NUM0, "max_kld": _NUM0, "min_top1": _NUM0}},
        "checks": {"type": "array", "items": {
            "type": "object", "required": ["name", "value", "op", "limit", "passed"],
            "properties": {"name": {"enum": ["ppl_increase", "kld_mean", "top1"]}, "value": _NUM,
                           "op": {"enum": ["<=", ">="]}, "limit": _NUM, "passed": {"type": "boolean"}}}},
        "kld_histogram": {"type": "object", "required": ["edges", "counts"],
                          "properties": {"edges": {"type": "array", "items": _NUM0},
                                         "counts": {"type": "array", "items": {"type": "integer", "minimum": 0}}}},
        "layers": {"type": ["object", "null"], "required": ["reference", "windows", "per_layer", "worst_layer",
                                                            "top_experts"],
                   "properties": {
                       "reference": {"type": "string"},
                       "windows": {"type": "integer", "minimum": 1},
                       "worst_layer": {"type": "integer", "minimum": 0},
                       "per_layer": {"type": "array", "items": {
                           "type": "object",
                           "required": ["layer", "mixer", "ffn", "cumulative_rel", "local_rel", "mixer_rel",
                                        "ffn_rel", "router_flip"],
                           "properties": {"layer": {"type": "integer", "minimum": 0},
                                          "mixer": {"enum": ["GatedDeltaNet", "GatedAttention"]},
                                          "ffn": {"enum": ["SparseMoE", "DenseMLP"]},
                                          "cumulative_rel": _NUM0, "local_rel": _NUM0, "mixer_rel": _NUM0,
                                          "ffn_rel": _NUM0, "router_flip": {"type": ["number", "null"]}}}},
                       "top_experts": {"type": "array", "items": {
                           "type": "object", "required": ["layer", "expert", "sq_err", "rel_err", "tokens"],
                           "properties": {"layer": {"type": "integer"}, "expert": {"type": ["integer", "string"]},
                                          "sq_err": _NUM0, "rel_err": _NUM0,
                                          "tokens": {"type": "integer", "minimum": 1}}}}}},
        "cache": {"type": "object", "required": ["enabled", "hit", "mode"],
                  "properties": {"enabled": {"type": "boolean"}, "hit": {"type": "boolean"},
                                 "mode": {"type": "string"}, "key": {"type": ["string", "null"]}}},
        "timing": {"type": "object", "required": ["reference_s", "candidate_s", "candidate_tokens_per_s"],
                   "properties": {"reference_s": _NUM0, "candidate_s": _NUM0, "candidate_tokens_per_s": _NUM0}},
        "files": {"type": "object", "properties": {"markdown": {"type": "string"}, "kld_plot": {"type": "string"},
                                                   "layers_plot": {"type": ["string", "null"]}}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}


def validate_doc(doc: Any, schema: dict[str, Any] = REPORT_SCHEMA, where: str = "report") -> list[str]:
    """Every place `doc` breaks `schema`, as 'path: expected X, got Y' lines (empty when it conforms)."""
    errors: list[str] = []
    if "const" in schema and doc != schema["const"]:
        return [f"{where}: expected {schema['const']!r}, got {doc!r}"]
    if "enum" in schema and doc not in schema["enum"]:
        return [f"{where}: expected one of {schema['enum']}, got {doc!r}"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(doc, _TYPES[t]) and not (t in ("integer", "number") and isinstance(doc, bool))
                 for t in types)
        if not ok:
            return [f"{where}: expected {'|'.join(types)}, got {type(doc).__name__}"]
    if doc is None:
        return errors
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        if "minimum" in schema and doc < schema["minimum"]:
            errors.append(f"{where}: expected >= {schema['minimum']}, got {doc}")
        if "maximum" in schema and doc > schema["maximum"]:
            errors.append(f"{where}: expected <= {schema['maximum']}, got {doc}")
    if isinstance(doc, dict):
        errors += [f"{where}.{k}: missing" for k in schema.get("required", []) if k not in doc]
        for k, sub in schema.get("properties", {}).items():
            if k in doc:
                errors += validate_doc(doc[k], sub, f"{where}.{k}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            errors += validate_doc(item, schema["items"], f"{where}[{i}]")
    return errors


def read_report(path: str | Path) -> dict[str, Any]:
    """A report file (untrusted: bounded JSON, then REPORT_SCHEMA); errors name the file and the fields."""
    from nextq.untrusted import need, read_json

    doc = read_json(path)
    need(doc.get("format") == REPORT_FORMAT, str(path), f"format {doc.get('format')!r:.40}, expected "
                                                        f"{REPORT_FORMAT!r} (a `nextq validate --report` file)")
    problems = validate_doc(doc)
    need(not problems, str(path), f"not a valid validation report: {'; '.join(problems[:3])}")
    for side in ("candidate", "reference"):
        need("\0" not in doc[side]["path"], f"{path}: {side}.path", "contains a NUL byte")
    return doc


# ---- building and writing ---------------------------------------------------------------------------------------


def build_report(c: Comparison, t: Thresholds) -> dict[str, Any]:
    """The report dict (REPORT_SCHEMA) of one comparison under thresholds `t`."""
    w = c.windows
    cks = checks(c.metrics, t)
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "nextq_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "passed": all(x["passed"] for x in cks),
        "candidate": c.candidate,
        "reference": c.reference,
        "corpus": {"name": w.corpus, "sha256": w.corpus_sha256, "tokens": w.total_tokens, "window": w.window,
                   "stride": w.stride, "windows": int(w.ids.shape[0]), "scored_tokens": w.scored_tokens},
        "metrics": c.metrics,
        "thresholds": asdict(t),
        "checks": cks,
        "kld_histogram": kld_histogram(c.kld),
        "layers": c.layers,
        "cache": c.cache,
        "timing": c.timing,
        "files": {},
    }


def markdown(r: dict[str, Any]) -> str:
    """A human summary of a report."""
    m = r["metrics"]
    lines = [
        f"# nextq validate: {'PASS' if r['passed'] else 'FAIL'}",
        "",
        f"- candidate: `{r['candidate']['path']}` ({r['candidate']['backend']})",
        f"- reference: `{r['reference']['path']}` ({r['reference']['backend']})",
        f"- corpus: {r['corpus']['name']}, {r['corpus']['scored_tokens']} scored tokens in {r['corpus']['windows']} "
        f"windows of {r['corpus']['window']} (stride {r['corpus']['stride']})",
        "",
        "| check | value | limit | result |",
        "| --- | ---: | ---: | --- |",
    ]
    for ck in r["checks"]:
        lines.append(f"| {ck['name']} | {ck['value']:.4g} | {ck['op']} {ck['limit']:.4g} | "
                     f"{'pass' if ck['passed'] else '**FAIL**'} |")
    lines += ["", "| metric | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.6g} |" for k, v in m.items()]
    if r["layers"]:
        L = r["layers"]
        lines += ["", f"## Per-layer drift (worst layer: {L['worst_layer']})", "",
                  "| layer | mixer | ffn | cumulative | local | mixer | ffn | router flips |",
                  "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for p in L["per_layer"]:
            flip = "" if p["router_flip"] is None else f"{p['router_flip']:.3f}"
            lines.append(f"| {p['layer']} | {p['mixer']} | {p['ffn']} | {p['cumulative_rel']:.4g} | "
                         f"{p['local_rel']:.4g} | {p['mixer_rel']:.4g} | {p['ffn_rel']:.4g} | {flip} |")
        lines += ["", "Experts contributing most (squared error of the weighted output, reference routing):", "",
                  "| layer | expert | sq. error | rel. error | tokens |", "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {e['layer']} | {e['expert']} | {e['sq_err']:.4g} | {e['rel_err']:.4g} | {e['tokens']} |"
                  for e in L["top_experts"]]
    for key, title in (("kld_plot", "KL histogram"), ("layers_plot", "Per-layer drift")):
        if r["files"].get(key):
            lines += ["", f"![{title}]({r['files'][key]})"]
    return "\n".join(lines) + "\n"


def plot_kld(hist: dict[str, list], out: Path) -> None:
    """Histogram of per-position KL (log-x bins, log-y counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"])
    lo = np.maximum(edges[:-1], 1e-7)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(lo, counts, width=np.maximum(edges[1:], 1e-6) - lo, align="edge", color="tab:blue")
    ax.set_xscale("log")
    ax.set_yscale("symlog")
    ax.set_xlabel("KL(reference || candidate) per position, nats")
    ax.set_ylabel("positions")
    ax.set_title("KL divergence histogram")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_layers(layers: dict[str, Any], out: Path) -> None:
    """Per-layer local and cumulative relative drift, the worst layer highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layers["per_layer"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.4), 3.5))
    colors = ["tab:red" if r["layer"] == layers["worst_layer"] else "tab:orange" for r in rows]
    ax.bar(x, [r["local_rel"] for r in rows], color=colors, label="local (own error)")
    ax.plot(x, [r["cumulative_rel"] for r in rows], "o-", color="tab:blue", label="cumulative (hidden state)")
    ax.set_xticks(x, [f"{r['layer']}{'A' if r['mixer'] == 'GatedAttention' else ''}" for r in rows])
    ax.set_xlabel("layer (A = full attention)")
    ax.set_ylabel("relative error")
    ax.set_title(f"Per-layer drift (worst: layer {layers['worst_layer']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_report(r: dict[str, Any], path: str | Path, force: bool = False) -> dict[str, Path]:
    """Write report.json, report.md and the plots beside it; each file goes to a temporary name and is renamed.

    Refuses an existing report unless `force`. Returns {"json", "markdown", "kld_plot", "layers_plot"?}.
    """
    path = Path(path)
    if path.suffix != ".json":
        raise NextqError(f"--report {path}: expected a .json file name")
    stem = path.with_suffix("")
    paths = {"json": path, "markdown": stem.with_suffix(".md"), "kld_plot": Path(f"{stem}-kld.png")}
    if r["layers"]:
        paths["layers_plot"] = Path(f"{stem}-layers.png")
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise OutputExistsError(f"{', '.join(existing)}: output exists (pass --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    r["files"] = {"markdown": paths["markdown"].name, "kld_plot": paths["kld_plot"].name,
                  "layers_plot": paths["layers_plot"].name if "layers_plot" in paths else None}
    problems = validate_doc(r)
    assert not problems, problems  # build_report's output must match the schema it documents
    writers = {"json": lambda p: p.write_text(json.dumps(r, indent=1)),
               "markdown": lambda p: p.write_text(markdown(r)),
               "kld_plot": lambda p: plot_kld(r["kld_histogram"], p),
               "layers_plot": lambda p: plot_layers(r["layers"], p)}
    for key, final in paths.items():
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}{final.suffix}")
        try:
            writers[key](tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    return paths

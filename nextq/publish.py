"""`nextq publish DIR --repo-id ID`: upload a pipeline's artifacts to the Hugging Face Hub with a generated card.

DIR layout (every file keeps its path relative to DIR in the repo):

    DIR/                     (what `nextq pipeline` writes)
      quantized/ or ir/      the IR to publish (graph.json + shards + tokenizer files)   --include ir
                             (quantized/ wins: in a pipeline output ir/ is the float original and stays home)
      *.gguf                 GGUF files                                                  --include gguf
      onnx/                  ONNX directory (model.onnx [+ mtp.onnx] + model.onnx.data)   --include onnx
      *.json, reports/*.json `nextq validate` reports (format nextq-validate-report); under reports/ or named
                             *report*: must be valid reports; other JSON (summary.json) is ignored

A plain IR directory (graph.json at DIR's top) or a plain ONNX directory (model.onnx at the top) works too: it
is uploaded at the repo's root. Anything else in DIR (summary.json, report plots, the float ir/) stays home.
The card is built from the IR's graph.json (provenance, tensor index), so DIR must hold an IR even when only
the GGUF/ONNX files are uploaded.

Validation: every uploaded artifact needs a report whose candidate is that artifact (same backend, and the same
path, or the same name when the validated path no longer exists, e.g. a pipeline's renamed temporary directory).
A report naming an artifact that DIR does not hold is refused; so is a missing report, unless
`--allow-unvalidated` (the card then says "not validated" for that artifact). The reports used are uploaded too.

Upload: one commit through huggingface_hub (`create_commit`): large files go through Xet or LFS with the client's
progress bars; a failed run commits nothing, and a rerun sends only what the server does not hold yet (LFS
batch / Xet dedup answer "already present"). The token comes from HF_TOKEN or the standard login
(`huggingface_hub.get_token()`) and is never printed or written.

    plan = make_plan("out", "me/model-int4")          # reads DIR, checks reports, builds the card; no network
    publish("out", "me/model-int4")                   # the same + upload; returns the plan
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from .console import console, out
from .errors import InputError, PublishError
from .untrusted import read_json, regular_file_inside, resolve_inside
from .inspect import human
from .targets import TARGETS as KINDS

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a Hub "namespace/name" (local paths never match twice)


# ---- artifacts (their kinds: nextq.targets) ----------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    kind: str
    path: Path  # local file or directory
    repo_path: str  # its path in the repo ("" = the repo root)
    files: tuple[tuple[Path, str], ...]  # (local file, path in repo)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p, _ in self.files)

    @property
    def label(self) -> str:
        return self.repo_path or "."


def _repo_path(p: Path, root: Path) -> str:
    return "" if p == root else p.relative_to(root).as_posix()


def find_artifacts(directory: Path) -> list[Artifact]:
    """Every artifact DIR holds, in KINDS order."""
    arts = []
    for kind, k in KINDS.items():
        for p in k.find(directory):
            files = tuple((f, f.relative_to(directory).as_posix()) for f in k.files(p))
            arts.append(Artifact(kind, p, _repo_path(p, directory), files))
    return arts


# ---- validation reports -----------------------------------------------------------------------------------------
# Reading a report is these few lines plus REPORT_COLUMNS: align them with validate/report.py when it changes.

REPORT_COLUMNS = {  # card column -> key in the report's "metrics"
    "PPL ref": "ppl_reference", "PPL": "ppl_candidate", "PPL ratio": "ppl_ratio", "KLD mean": "kld_mean",
    "KLD p99": "kld_p99", "top-1": "top1", "max logit err": "logit_err_max",
}


@dataclass(frozen=True)
class Report:
    path: Path
    doc: dict[str, Any]

    @property
    def candidate(self) -> dict[str, str]:
        return self.doc["candidate"]


def find_reports(directory: Path) -> list[Report]:
    """`nextq validate` reports in DIR/*.json and DIR/reports/*.json. Anything under reports/ or named *report*
    must be a valid report (else an error); other JSON files (summary.json, ...) are skipped."""
    from .validate.report import REPORT_FORMAT, read_report

    reports = []
    for p in sorted([*directory.glob("*.json"), *directory.glob("reports/*.json")]):
        regular_file_inside(directory, p, "report")
        strict = p.parent != directory or "report" in p.name
        if not strict:  # summary.json and the like: skipped unless it says it is a report
            try:
                doc = read_json(p, expect=None)
            except InputError:
                continue
            if not isinstance(doc, dict) or doc.get("format") != REPORT_FORMAT:
                continue
        try:
            reports.append(Report(p, read_report(p)))
        except InputError as e:
            raise PublishError(f"not a readable validation report: {e}") from None
    return reports


def _validates(report: Report, art: Artifact) -> bool:
    """Whether `report`'s candidate is `art`: same backend, and the same path when the validated path still
    exists (as given, or relative to the report), else the same name."""
    if not KINDS[art.kind].validated_by(report.candidate["backend"]):
        return False
    cand = Path(report.candidate["path"])
    for p in ([cand] if cand.is_absolute() else [cand, report.path.parent / cand]):
        if p.exists():
            return p.resolve() == art.path.resolve()
    return cand.name == art.path.name


def match_reports(reports: list[Report], artifacts: list[Artifact], chosen: list[Artifact],
                  allow_unvalidated: bool) -> dict[Artifact, list[Report]]:
    """Reports per chosen artifact. Refuses a report whose candidate DIR does not hold, and (unless
    `allow_unvalidated`) a chosen artifact without a report."""
    found: dict[Artifact, list[Report]] = {a: [] for a in artifacts}
    for r in reports:
        hits = [a for a in artifacts if _validates(r, a)]
        if not hits:
            have = ", ".join(f"{a.label} ({KINDS[a.kind].backend})" for a in artifacts)
            raise PublishError(f"{r.path}: validates {r.candidate['path']!r} ({r.candidate['backend']}), which is "
                               f"not an artifact of this directory (artifacts: {have}); refusing to publish a card "
                               f"claiming results for it")
        found[hits[0]].append(r)
    missing = [a.label for a in chosen if not found[a]]
    if missing and not allow_unvalidated:
        raise PublishError(f"no validation report for {', '.join(missing)}: expected a `nextq validate CANDIDATE "
                           f"--reference REF --report DIR/report-NAME.json` per artifact (or pass "
                           f"--allow-unvalidated to publish it marked 'not validated')")
    return {a: found[a] for a in chosen}


# ---- the model card ---------------------------------------------------------------------------------------------

LICENSE_TEXTS = {  # SPDX-like Hub license id -> a phrase its LICENSE file contains
    "apache-2.0": r"Apache License\s+Version 2\.0",
    "mit": r"Permission is hereby granted, free of charge",
    "bsd-3-clause": r"Neither the name of the copyright holder",
}


def source_license(ir: Path) -> dict[str, str]:
    """The license the source carried into the IR: README front matter > LICENSE text > config; else unknown."""
    from huggingface_hub import ModelCard

    readme = resolve_inside(ir, "README.md", "asset")
    if readme.is_file():
        data = ModelCard(readme.read_text(), ignore_metadata_errors=True).data
        if data.license:
            return {k: v for k in ("license", "license_name", "license_link") if (v := getattr(data, k, None))}
    lic = resolve_inside(ir, "LICENSE", "asset")
    if lic.is_file():
        text = lic.read_text(errors="replace")
        spdx = next((k for k, rx in LICENSE_TEXTS.items() if re.search(rx, text)), None)
        return {"license": spdx} if spdx else {"license": "other", "license_name": "source-license",
                                                "license_link": "LICENSE"}
    cfg = resolve_inside(ir, "source_config.json", "asset")
    lic_id = read_json(cfg).get("license") if cfg.is_file() else None
    return {"license": lic_id if isinstance(lic_id, str) and lic_id else "unknown"}


def recipe_rows(ir: Path) -> tuple[list[list[str]], dict[str, Any]]:
    """One row per tensor class: class, schemes (largest first), parameters, bytes, bits/weight; and totals."""
    from .graph import Graph, QuantRef
    from .inspect import tensor_storage
    from .quant.recipes import tensor_classes

    graph = Graph.load(ir)
    storage = tensor_storage(graph)  # name -> (scheme or dtype, bytes)
    classes = tensor_classes(graph.config)
    acc: dict[str, dict[str, Any]] = defaultdict(lambda: {"schemes": defaultdict(int), "params": 0, "bytes": 0})
    for name, (scheme, nbytes) in storage.items():
        a, n = acc[classes[name]], math.prod(graph.tensors[name].shape)
        a["schemes"][scheme] += n
        a["params"] += n
        a["bytes"] += nbytes
    rows = [[cls, ", ".join(s for s, _ in sorted(a["schemes"].items(), key=lambda kv: -kv[1])), human(a["params"]),
             human(a["bytes"]) + "B", f"{8 * a['bytes'] / a['params']:.2f}"] for cls, a in acc.items()]
    params, nbytes = sum(a["params"] for a in acc.values()), sum(a["bytes"] for a in acc.values())
    quantized = sorted({t.meta["scheme"] for t in graph.tensors.values() if isinstance(t, QuantRef)})
    return rows, {"params": params, "bytes": nbytes, "graph": graph, "quantized": quantized}


def _name_only(p: str) -> str:
    """A report path as shown publicly: a Hub id as is, a local path by its last component (no machine paths)."""
    return p if HUB_ID.match(p) and not Path(p).exists() else Path(p).name or p


def validation_rows(matched: dict[Artifact, list[Report]]) -> list[list[str]]:
    rows = []
    for art, reports in matched.items():
        for r in reports:
            d, m = r.doc, r.doc["metrics"]
            ref = d["reference"]
            corpus = f"{d['corpus']['name']} ({d['corpus']['scored_tokens']} tokens)"
            rows.append([art.label, f"{_name_only(ref['path'])} ({ref['backend']})", corpus,
                         *(f"{m[k]:.4g}" for k in REPORT_COLUMNS.values()), "pass" if d["passed"] else "**FAIL**"])
        if not reports:
            rows.append([art.label, "-", "-", *["-"] * len(REPORT_COLUMNS), "not validated"])
    return rows


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ 'Quantized' if quantized else 'Converted' }} **{{ architecture }}** {% if base_model %}from [{{ base_model }}](https://huggingface.co/{{ base_model }}){% if revision %} (revision `{{ revision }}`){% endif %}{% else %}from a local checkpoint{% endif %}, made with nextq ({{ tool }}).
License: `{{ license }}`, carried from the source.

## Files

| artifact | engine | path | files | size | bits/param |
| --- | --- | --- | ---: | ---: | ---: |
{% for r in files %}| {{ r | join(" | ") }} |
{% endfor %}
Parameters: {{ params }} ({{ config }}). Bits/param = bytes × 8 / parameters of the whole file(s), tokenizer and metadata included.

## Quantization recipe
{% if recipe %}
Recipe `{{ recipe.name }}`: {{ recipe.description }}{% if calibration %} Calibration: {{ calibration.method }} on {{ calibration.calibration_tokens }} tokens.{% endif %}
{% endif %}
| tensor class | scheme | parameters | bytes | bits/weight |
| --- | --- | ---: | ---: | ---: |
{% for r in recipe_rows %}| {{ r | join(" | ") }} |
{% endfor %}
int4_sym_g32 is bit-identical to GGUF Q4_0, int4_asym_g32 to Q4_1, int8_g32 to Q8_0; a dtype name (bfloat16, float32, ...) means stored unquantized.

## Validation

`nextq validate` against the reference: perplexity, KL divergence (nats), top-1 agreement and logit error over the corpus; the gate's verdict in the last column. The reports are in this repo ({{ report_files }}).

| artifact | reference | corpus | {{ columns | join(" | ") }} | gate |
| --- | --- | --- |{% for c in columns %} ---: |{% endfor %} --- |
{% for r in validation %}| {{ r | join(" | ") }} |
{% endfor %}
## How to run
{% for a in runs %}
### {{ a.engine }}: `{{ a.label }}`

{{ a.text }}
{% endfor %}"""


def build_card(repo_id: str, ir: Path, chosen: list[Artifact], matched: dict[Artifact, list[Report]],
               report_files: list[str], base_model: str | None = None, license: str | None = None) -> str:
    """The README.md (YAML front matter + Markdown), rendered with huggingface_hub's ModelCard tools."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    rows, totals = recipe_rows(ir)
    graph, c = totals["graph"], totals["graph"].config
    prov = graph.provenance
    quant = prov.get("quantization") if isinstance(prov.get("quantization"), dict) else {}  # provenance is free-form
    source = str(prov.get("source") or "")
    base_model = base_model or (source if HUB_ID.match(source) and not Path(source).exists() else None)
    lic = {"license": license} if license else source_license(ir)
    kinds = list(dict.fromkeys(a.kind for a in chosen))
    quantized = totals["quantized"]  # the quantized schemes (empty for a float IR)
    data = ModelCardData(
        base_model=base_model, base_model_relation="quantized" if base_model and quantized else None, **lic,
        library_name=KINDS[kinds[0]].library, pipeline_tag="text-generation",
        tags=["nextq", c.family, *(["quantized"] if quantized else []), *(KINDS[k].tag for k in kinds),
              *quantized])
    files = [[a.kind, KINDS[a.kind].engine, f"`{a.label}`", str(len(a.files)), human(a.size) + "B",
              f"{8 * a.size / totals['params']:.2f}"] for a in chosen]
    runs = [{"engine": KINDS[a.kind].engine, "label": a.label, "text": KINDS[a.kind].run(repo_id, a.repo_path)}
            for a in chosen]
    card = ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, title=repo_id.split("/")[-1], quantized=bool(quantized),
        architecture=prov.get("architecture", "Qwen3NextForCausalLM"), revision=prov.get("revision"),
        tool=prov.get("tool") or f"nextq {__version__}", license=lic["license"], files=files,
        params=human(totals["params"]),
        config=(f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                + (f"{c.num_experts} experts top-{c.num_experts_per_tok}" if c.num_experts
                   else f"dense MLP {c.intermediate_size}") + f", vocab {c.vocab_size}"),
        recipe=quant.get("recipe"), calibration=quant.get("calibration"), recipe_rows=rows,
        columns=list(REPORT_COLUMNS), validation=validation_rows(matched),
        report_files=", ".join(f"`{f}`" for f in report_files) or "none", runs=runs)
    return str(card)


# ---- the plan ---------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything a publish will do, computed without touching the network."""

    repo_id: str
    revision: str | None
    private: bool
    artifacts: list[Artifact]
    files: list[tuple[Path, str]]  # (local file, path in repo), README.md excluded
    card: str
    reports: dict[Artifact, list[Report]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p, _ in self.files) + len(self.card.encode())


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    why = None
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        why = str(e).splitlines()[0]
    if why or repo_id.count("/") != 1:  # the namespace is explicit: the card's run instructions name the repo
        raise PublishError(f"--repo-id {repo_id!r}: expected 'namespace/name' (letters, digits, '-', '_', '.'; "
                           f"at most 96 characters){': ' + why if why else ''}")


def parse_include(text: str | None) -> list[str] | None:
    if text is None:
        return None
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise PublishError(f"--include {text!r}: expected a comma-separated subset of {', '.join(KINDS)}")
    return kinds


def make_plan(directory: str | Path, repo_id: str, *, include: list[str] | None = None, revision: str | None = None,
              private: bool = False, allow_unvalidated: bool = False, base_model: str | None = None,
              license: str | None = None) -> Plan:
    """Read DIR, choose the artifacts, check the reports, render the card. No network, nothing written."""
    check_repo_id(repo_id)
    directory = Path(directory)
    if not directory.is_dir():
        raise PublishError(f"{directory}: expected a pipeline output directory or an IR directory, got "
                           f"{'a file' if directory.exists() else 'nothing'}")
    artifacts = find_artifacts(directory)
    irs = [a for a in artifacts if a.kind == "ir"]
    if not irs:
        raise PublishError(f"{directory}: no IR directory (graph.json at the top, in quantized/ or in ir/); the card "
                           f"is built from its provenance and tensor index")
    kinds = include or list(dict.fromkeys(a.kind for a in artifacts))
    absent = [k for k in kinds if not any(a.kind == k for a in artifacts)]
    if absent:
        raise PublishError(f"--include {','.join(kinds)}: {directory} has no {', '.join(absent)} artifact "
                           f"(found: {', '.join(a.label for a in artifacts)})")
    chosen = [a for a in artifacts if a.kind in kinds]
    matched = match_reports(find_reports(directory), artifacts, chosen, allow_unvalidated)
    files = [f for a in chosen for f in a.files]
    reports = [(r.path, r.path.relative_to(directory).as_posix()) for rs in matched.values() for r in rs]
    files += reports
    lic = irs[0].path / "LICENSE"
    if lic.is_file() and "LICENSE" not in {p for _, p in files}:
        files.append((lic, "LICENSE"))  # the source's license travels with the weights
    files = [(regular_file_inside(directory, p, "upload"), rp) for p, rp in dict.fromkeys(files)]
    if "README.md" in {p for _, p in files}:
        files = [f for f in files if f[1] != "README.md"]  # the generated card replaces a carried README
    card = build_card(repo_id, irs[0].path, chosen, matched, [rp for _, rp in reports], base_model, license)
    return Plan(repo_id, revision, private, chosen, files, card, matched)


def print_plan(plan: Plan, token_found: bool) -> None:
    from rich.table import Table

    t = Table(title=f"publish plan: {plan.repo_id}@{plan.revision or 'main'} "
                    f"({'private' if plan.private else 'public'}; token {'found' if token_found else 'MISSING'})")
    t.add_column("path in repo")
    t.add_column("size", justify="right")
    t.add_column("from")
    for p, rp in plan.files:
        t.add_row(rp, human(p.stat().st_size) + "B", str(p))
    t.add_row("README.md", human(len(plan.card.encode())) + "B", "generated card")
    t.add_row("total", human(plan.size) + "B", f"{len(plan.files) + 1} files", style="bold")
    out.print(t)
    click.echo(plan.card)


# ---- uploading --------------------------------------------------------------------------------------------------


def resolve_token() -> str:
    """HF_TOKEN, else the standard login's token; never printed."""
    from huggingface_hub import get_token

    token = get_token()  # HF_TOKEN first, then the stored login
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return token


def _one_line(e: BaseException, token: str) -> str:
    """The exception and its cause as one line, the token masked should a server ever echo it."""
    parts = [f"{type(x).__name__}: {str(x).strip().splitlines()[0] if str(x).strip() else ''}"
             for x in (e, e.__cause__) if x is not None]
    return " <- ".join(parts).replace(token, "***")


def upload(plan: Plan, token: str) -> str:
    """Create the repo (and branch) if needed and push everything in one commit; returns the commit URL."""
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    where = f"{plan.repo_id}@{plan.revision or 'main'}"
    step = "checking the token"
    try:
        api.whoami()
        step = "creating the repo"
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        if plan.revision and plan.revision != "main":
            step = f"creating branch {plan.revision}"
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=rp, path_or_fileobj=str(p)) for p, rp in plan.files]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode()))
        step = "uploading"
        console.print(f"uploading {len(ops)} files ({human(plan.size)}B) to {where}")
        info = api.create_commit(plan.repo_id, ops, revision=plan.revision,
                                 commit_message=f"nextq publish: {', '.join(a.label for a in plan.artifacts)}")
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError, RuntimeError) as e:
        resume = "; rerun the same command to resume: files the server already holds are not sent again"
        raise PublishError(f"{where}: {step} failed, nothing was committed ({_one_line(e, token)})"
                           f"{resume if step == 'uploading' else ''}") from None
    return str(info.commit_url)


def publish(directory: str | Path, repo_id: str, *, include: list[str] | None = None, private: bool = False,
            revision: str | None = None, dry_run: bool = False, allow_unvalidated: bool = False,
            base_model: str | None = None, license: str | None = None) -> Plan:
    """Plan (no network), then upload unless `dry_run`. The library form of `nextq publish`."""
    plan = make_plan(directory, repo_id, include=include, revision=revision, private=private,
                     allow_unvalidated=allow_unvalidated, base_model=base_model, license=license)
    if dry_run:
        from huggingface_hub import get_token

        print_plan(plan, token_found=bool(get_token()))
        return plan
    url = upload(plan, resolve_token())
    console.print(f"[green]published[/] {len(plan.files) + 1} files to {plan.repo_id}: {url}")
    return plan


@click.command("publish")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repo-id", required=True, help="Hub model repo, namespace/name (created if needed).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to commit to (created if needed; default main).")
@click.option("--include", help=f"Comma-separated artifact kinds to upload ({','.join(KINDS)}; default: all found).")
@click.option("--dry-run", is_flag=True, help="Print the plan (repo, files, sizes, card) and touch nothing.")
@click.option("--allow-unvalidated", is_flag=True, help="Publish artifacts without a validation report (the card "
                                                        "marks them 'not validated').")
@click.option("--base-model", help="Hub id of the base model (default: the IR's provenance source when it is one).")
@click.option("--license", "license_", help="License id for the card (default: carried from the source).")
def publish_cmd(directory, repo_id, private, revision, include, dry_run, allow_unvalidated, base_model, license_):
    """Upload DIR's artifacts (GGUF, ONNX, IR) and their validation reports to the Hub with a generated card."""
    publish(directory, repo_id, include=parse_include(include), private=private, revision=revision, dry_run=dry_run,
            allow_unvalidated=allow_unvalidated, base_model=base_model, license=license_)

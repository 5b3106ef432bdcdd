"""`nextq publish` against a loopback Hub: the real huggingface_hub client talks to an in-process HTTP server
(127.0.0.1 only) that speaks the endpoints the client calls — whoami, repo/branch creation, YAML validation,
preupload, the LFS batch API with single-part and multipart uploads + verify, the NDJSON commit and repo info.
The server keeps its state across runs within a test (so a rerun after a failure resumes) and records every
request, so the tests assert what the Hub received, byte for byte."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from click.testing import CliRunner

from nextq.cli import main
from nextq.publish import make_plan

PART = 1 << 20  # multipart chunk the fake LFS server asks for: the 3 MiB GGUF goes up in 3 parts
LFS_SUFFIXES = (".gguf", ".onnx", ".data", ".safetensors")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The Hub's state (repos -> branches -> files, LFS objects) and a log of every request."""

    def __init__(self, token: str):
        self.token = token
        self.lock = threading.Lock()
        self.repos: dict[str, dict] = {}  # id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.objects: dict[str, bytes] = {}  # sha256 -> content
        self.parts: dict[str, dict[int, bytes]] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.fail: set[tuple] = set()  # one-shot failures: ("part", oid, n) answered 507
        self.commits: list[list[dict]] = []
        self.url = ""

    def puts(self) -> list[str]:
        return [p for m, p, _ in self.log if m == "PUT"]


def make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while (n := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    data += self.rfile.read(n)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def reply(self, status: int, doc=None, headers: dict | None = None):
            raw = json.dumps(doc if doc is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def authed(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def handle_any(self, method: str):
            path = urlsplit(self.path).path
            data = self.body()
            with hub.lock:
                hub.log.append((method, path, self.headers.get("Authorization")))
            for m, rx, fn in ROUTES:
                hit = re.fullmatch(rx, path)
                if m == method and hit:
                    with hub.lock:
                        return fn(self, data, *map(unquote, hit.groups()))
            self.reply(404, {"error": f"no route {method} {path}"})

        def do_GET(self):
            self.handle_any("GET")

        def do_POST(self):
            self.handle_any("POST")

        def do_PUT(self):
            self.handle_any("PUT")

        # ---- endpoints ----
        def whoami(self, data):
            if not self.authed():
                return self.reply(401, {"error": "Invalid credentials in Authorization header"})
            self.reply(200, {"type": "user", "name": "tester", "auth": {"type": "access_token"}})

        def create_repo(self, data):
            if not self.authed():
                return self.reply(401, {"error": "Invalid credentials"})
            doc = json.loads(data)
            repo = f"{doc.get('organization') or 'tester'}/{doc['name']}"
            if repo in hub.repos:
                return self.reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
            hub.repos[repo] = {"private": doc.get("private") or doc.get("visibility") == "private",
                               "branches": {"main": {}}}
            self.reply(200, {"url": f"{hub.url}/{repo}"})

        def create_branch(self, data, repo, branch):
            if repo not in hub.repos:
                return self.reply(404, {"error": "Repository not found"})
            branches = hub.repos[repo]["branches"]
            if branch in branches:
                return self.reply(409, {"error": "Reference already exists"})
            branches[branch] = dict(branches["main"])
            self.reply(200, {})

        def validate_yaml(self, data):
            content = json.loads(data)["content"]
            m = re.match(r"---\n(.*?)\n---\n", content, re.S)
            meta = yaml.safe_load(m.group(1)) if m else None
            if not isinstance(meta, dict) or "license" not in meta:
                return self.reply(400, {"errors": [{"message": "metadata: expected a YAML block with a license"}]})
            self.reply(200, {"errors": [], "warnings": []})

        def preupload(self, data, repo, rev):
            if repo not in hub.repos or rev not in hub.repos[repo]["branches"]:
                return self.reply(404, {"error": f"{repo}@{rev} not found"})
            tree = hub.repos[repo]["branches"][rev]
            files = []
            for f in json.loads(data)["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 100_000
                old = tree.get(f["path"])
                oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old))
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            self.reply(200, {"files": files, "commitOid": "0" * 40})

        def lfs_batch(self, data, repo):
            if not self.authed() or repo not in hub.repos:
                return self.reply(404, {"message": "Repository not found"})
            doc = json.loads(data)
            assert doc["operation"] == "upload" and doc.get("hash_algo", "sha256") == "sha256"
            objects = []
            for o in doc["objects"]:
                oid, size = o["oid"], o["size"]
                if oid in hub.objects:  # already stored: no actions = "skip the upload"
                    objects.append({"oid": oid, "size": size})
                    continue
                verify = {"href": f"{hub.url}/lfs/{oid}/verify", "header": {}}
                if size > PART:
                    n = -(-size // PART)
                    header = {"chunk_size": str(PART), **{f"{i:05d}": f"{hub.url}/lfs/{oid}/part/{i}"
                                                          for i in range(1, n + 1)}}
                    up = {"href": f"{hub.url}/lfs/{oid}/complete", "header": header}
                else:
                    up = {"href": f"{hub.url}/lfs/{oid}"}
                objects.append({"oid": oid, "size": size, "actions": {"upload": up, "verify": verify}})
            self.reply(200, {"transfer": "basic", "objects": objects})

        def lfs_put(self, data, oid):
            if hashlib.sha256(data).hexdigest() != oid:
                return self.reply(400, {"error": f"sha256 mismatch for {oid}"})
            hub.objects[oid] = data
            self.reply(200, {})

        def lfs_part(self, data, oid, n):
            if ("part", oid, int(n)) in hub.fail:
                hub.fail.discard(("part", oid, int(n)))
                return self.reply(507, {"error": "Insufficient storage (injected)"})
            hub.parts.setdefault(oid, {})[int(n)] = data
            self.reply(200, {}, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

        def lfs_complete(self, data, oid):
            doc = json.loads(data)
            parts = hub.parts.pop(oid, {})
            want = [p["etag"] for p in doc["parts"]]
            if [f'"{hashlib.md5(parts.get(p["partNumber"], b"")).hexdigest()}"' for p in doc["parts"]] != want:
                return self.reply(400, {"error": "parts do not match their etags"})
            blob = b"".join(parts[p["partNumber"]] for p in doc["parts"])
            if hashlib.sha256(blob).hexdigest() != oid:
                return self.reply(400, {"error": f"sha256 mismatch for {oid}"})
            hub.objects[oid] = blob
            self.reply(200, {})

        def lfs_verify(self, data, oid):
            doc = json.loads(data)
            ok = oid in hub.objects and len(hub.objects[oid]) == doc["size"] and self.authed()
            self.reply(200 if ok else 404, {} if ok else {"error": f"object {oid} not found"})

        def commit(self, data, repo, rev):
            if not self.authed() or repo not in hub.repos or rev not in hub.repos[repo]["branches"]:
                return self.reply(404, {"error": f"{repo}@{rev} not found"})
            lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
            assert lines[0]["key"] == "header"
            staged = dict(hub.repos[repo]["branches"][rev])
            for item in lines[1:]:
                v = item["value"]
                if item["key"] == "file":
                    staged[v["path"]] = base64.b64decode(v["content"])
                elif item["key"] == "lfsFile":
                    if v["oid"] not in hub.objects:  # a commit naming an object never uploaded is refused whole
                        return self.reply(422, {"error": f"LFS object {v['oid']} for {v['path']} is missing"})
                    staged[v["path"]] = hub.objects[v["oid"]]
                else:
                    return self.reply(400, {"error": f"unsupported operation {item['key']}"})
            hub.repos[repo]["branches"][rev] = staged
            hub.commits.append(lines)
            oid = hashlib.sha1(data).hexdigest()
            self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None})

        def repo_info(self, data, repo, rev="main"):
            if repo not in hub.repos:
                return self.reply(404, {"error": "Repository not found"})
            tree = hub.repos[repo]["branches"].get(rev, {})
            self.reply(200, {"id": repo, "sha": hashlib.sha1(repr(sorted(tree)).encode()).hexdigest(),
                             "private": hub.repos[repo]["private"], "siblings": [{"rfilename": p} for p in tree]})

    REPO = r"([\w.-]+/[\w.-]+)"
    ROUTES = [
        ("GET", r"/api/whoami-v2", Handler.whoami),
        ("POST", r"/api/repos/create", Handler.create_repo),
        ("POST", rf"/api/models/{REPO}/branch/([^/]+)", Handler.create_branch),
        ("POST", r"/api/validate-yaml", Handler.validate_yaml),
        ("POST", rf"/api/models/{REPO}/preupload/([^/]+)", Handler.preupload),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", Handler.lfs_batch),
        ("PUT", r"/lfs/([0-9a-f]{64})", Handler.lfs_put),
        ("PUT", r"/lfs/([0-9a-f]{64})/part/(\d+)", Handler.lfs_part),
        ("POST", r"/lfs/([0-9a-f]{64})/complete", Handler.lfs_complete),
        ("POST", r"/lfs/([0-9a-f]{64})/verify", Handler.lfs_verify),
        ("POST", rf"/api/models/{REPO}/commit/([^/]+)", Handler.commit),
        ("GET", rf"/api/models/{REPO}", Handler.repo_info),
        ("GET", rf"/api/models/{REPO}/revision/([^/]+)", Handler.repo_info),
    ]
    return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh loopback Hub; HF_ENDPOINT points at it, Xet is off (the client then speaks LFS), no stored login."""
    import huggingface_hub.constants as C

    token = "hf_" + secrets.token_hex(16)
    state = FakeHub(token)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setattr(C, "ENDPOINT", state.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)  # read at import time; is_xet_available() checks this
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(C, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(C, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(C, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))  # cached by the client
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


# ---- the pipeline output directory ------------------------------------------------------------------------------

def report_doc(path: str, backend: str, kld: float, passed: bool = True) -> dict:
    """A `nextq validate` report (format of validate/report.py), checked against its schema below."""
    metrics = {"ppl_reference": 11.5, "ppl_candidate": 11.62, "ppl_ratio": 1.0104, "ppl_increase": 0.0104,
               "kld_mean": kld, "kld_p99": 0.071, "kld_max": 0.4, "top1": 0.953, "logit_err_max": 1.25,
               "logit_err_mean": 0.11, "positions": 4096}
    return {"format": "nextq-validate-report", "version": 1, "nextq_version": "0.1.0",
            "created": "2025-01-01T00:00:00+00:00", "passed": passed,
            "candidate": {"path": path, "backend": backend},
            "reference": {"path": "/data/ckpt/Qwen3-Next-80B-A3B-Instruct", "backend": "transformers"},
            "corpus": {"name": "builtin", "sha256": "0" * 64, "tokens": 5000, "window": 256, "stride": 256,
                       "windows": 16, "scored_tokens": 4080},
            "metrics": metrics, "thresholds": {"max_ppl_increase": 0.02, "max_kld": 0.02, "min_top1": 0.9},
            "checks": [{"name": "kld_mean", "value": kld, "op": "<=", "limit": 0.02, "passed": passed}],
            "kld_histogram": {"edges": [0.0, 0.1], "counts": [4096]}, "layers": None,
            "cache": {"enabled": False, "hit": False, "mode": "none"},
            "timing": {"reference_s": 1.0, "candidate_s": 1.0, "candidate_tokens_per_s": 100.0}, "files": {}}


@pytest.fixture(scope="module")
def pipeline_out(tmp_path_factory) -> Path:
    """`nextq pipeline`'s layout: ir/ (the float original, not published), quantized/ (a real quantized IR of a
    tiny random checkpoint: experts int4/int8, the rest bf16, with the source's Apache LICENSE), a 3 MiB .gguf,
    onnx/, summary.json, and reports/ with one validation report per artifact (+ its .md, not published)."""
    from conftest import build_checkpoint
    from nextq.convert.hf import read_hf
    from nextq.quant import quantize
    from nextq.validate.report import validate_doc

    root = tmp_path_factory.mktemp("publish")
    ckpt = build_checkpoint(root / "hf", "base")
    (ckpt / "LICENSE").write_text("                                 Apache License\n"
                                  "                           Version 2.0, January 2004\n")
    graph = read_hf(str(ckpt), hash_shards=False)
    graph.provenance.update(source="Qwen/Qwen3-Next-80B-A3B-Instruct", revision="0123abcd",
                            quantization={"recipe": {"name": "int4", "description": "routed experts int4 g32."},
                                          "calibration": None})

    def cast(name, t):
        if ".experts." in name:  # gate/up have K = 32 (int4 g32 fits), down has K = 16 (int8 per channel)
            return quantize(t, "int8_channel" if name.endswith("down.weight") else "int4_sym_g32")
        return t.bfloat16() if t.is_floating_point() else t

    out = root / "out"
    graph.save(out / "ir")
    graph.save(out / "quantized", cast=cast)
    rng = __import__("random").Random(0)
    (out / "model-int4.gguf").write_bytes(rng.randbytes(3 * PART + 12345))
    (out / "onnx").mkdir()
    (out / "onnx" / "model.onnx").write_bytes(rng.randbytes(2000))
    (out / "onnx" / "model.onnx.data").write_bytes(rng.randbytes(PART // 2))
    (out / "onnx" / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    (out / "summary.json").write_text('{"not": "a report"}')
    (out / "reports").mkdir()
    (out / "reports" / "ir.md").write_text("# nextq validate: PASS\n")
    # candidates named three ways: a path that no longer exists (matched by name), an absolute path, a path
    # relative to the report
    docs = {out / "report-gguf.json": report_doc("nextq-pipeline/model-int4.gguf", "llama.cpp", 0.0123),
            out / "reports" / "onnx.json": report_doc(str(out / "onnx"), "ort", 0.0125),
            out / "reports" / "ir.json": report_doc("../quantized", "torch", 0.0042)}
    for p, doc in docs.items():
        assert validate_doc(doc) == [], validate_doc(doc)  # the fixture must stay a valid report
        p.write_text(json.dumps(doc, indent=1))
    return out


@pytest.fixture
def out_dir(pipeline_out, tmp_path) -> Path:
    d = tmp_path / "out"
    shutil.copytree(pipeline_out, d)
    # the ONNX report names its candidate by absolute path: point it at this copy
    rp = d / "reports" / "onnx.json"
    rp.write_text(rp.read_text().replace(str(pipeline_out), str(d)))
    return d


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def front_matter(card: str) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


def expected_files(d: Path) -> dict[str, bytes]:
    files = {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    home = ("summary.json", "ir/", "reports/ir.md")  # not artifacts (ir/ is the float original): they stay home
    files = {k: v for k, v in files.items() if not k.startswith(home)}
    files["LICENSE"] = (d / "quantized" / "LICENSE").read_bytes()  # the source license goes to the repo root
    return files


def assert_no_token(hub: FakeHub, roots: list[Path], *texts: str):
    for t in texts:
        assert hub.token not in t
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                assert hub.token.encode() not in p.read_bytes(), p
    for repo in hub.repos.values():
        for tree in repo["branches"].values():
            assert all(hub.token.encode() not in v for v in tree.values())


# ---- tests ------------------------------------------------------------------------------------------------------

def test_publish_uploads_every_file_and_the_card(hub, out_dir, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    plan = make_plan(out_dir, "tester/qnext-int4")
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4")
    captured = capfd.readouterr()
    assert res.exit_code == 0, res.output
    tree = hub.repos["tester/qnext-int4"]["branches"]["main"]
    want = expected_files(out_dir)
    assert sorted(tree) == sorted([*want, "README.md"])
    for path, data in want.items():
        assert tree[path] == data, path  # byte for byte, LFS (multipart and single) and regular alike
    assert tree["README.md"] == plan.card.encode()  # the card the dry-run shows is the card uploaded
    assert len(hub.commits) == 1  # one commit: all or nothing
    # the GGUF went up in ceil(size / PART) parts, the small LFS files in one PUT each, regular files inline
    gguf_oid = hashlib.sha256(want["model-int4.gguf"]).hexdigest()
    assert sum(f"/lfs/{gguf_oid}/part/" in p for p in hub.puts()) == 4
    lfs = {v["value"]["path"] for v in hub.commits[0] if v["key"] == "lfsFile"}
    assert lfs == {"model-int4.gguf", "onnx/model.onnx", "onnx/model.onnx.data",
                   "quantized/shard-00001.safetensors"}
    # the token authenticated the API calls and appears nowhere else
    auth = {p: a for m, p, a in hub.log if p.startswith("/api/")}
    assert auth.pop("/api/agent-harnesses", None) is None  # the client's unauthenticated registry fetch
    assert set(auth.values()) == {f"Bearer {hub.token}"}
    assert_no_token(hub, [tmp_path], res.output, captured.out, captured.err)

    meta = front_matter(plan.card)
    assert meta["base_model"] == "Qwen/Qwen3-Next-80B-A3B-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"  # recognised from the source's LICENSE text
    assert meta["library_name"] == "gguf"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"gguf", "onnx", "safetensors", "quantized", "int4_sym_g32", "int8_channel"} <= set(meta["tags"])
    card = plan.card
    assert "(revision `0123abcd`)" in card
    assert "| experts | int4_sym_g32, int8_channel |" in card
    assert "/data/ckpt" not in card  # local paths are shown by name only
    assert "`report-gguf.json`, `reports/onnx.json`, `reports/ir.json`" in card  # the reports are uploaded too
    row = next(line for line in card.splitlines() if line.startswith("| model-int4.gguf | Qwen3-Next"))
    assert "| 0.0123 |" in row and "| 0.953 |" in row and row.endswith("| pass |")
    assert "llama-cli --hf-repo tester/qnext-int4 --hf-file model-int4.gguf" in card
    assert 'hf download tester/qnext-int4 --include "onnx/*" --local-dir model' in card

    # a second, unchanged run sends nothing and makes no commit
    n_puts = len(hub.puts())
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4")
    assert res.exit_code == 0, res.output
    assert len(hub.puts()) == n_puts and len(hub.commits) == 1


def test_dry_run_prints_the_plan_and_touches_nothing(hub, out_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4", "--dry-run")
    assert res.exit_code == 0, res.output
    assert hub.log == []  # no network call at all
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written
    assert make_plan(out_dir, "tester/qnext-int4").card in res.output
    assert "model-int4.gguf" in res.output and "3.2MB" in res.output and "token found" in res.output
    assert hub.token not in res.output


def test_no_token_refuses_before_any_request(hub, out_dir):
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4")
    assert res.exit_code == 2
    assert "error: no Hugging Face token: set HF_TOKEN or run `hf auth login`" in res.output
    assert hub.log == []


def test_rejected_token_is_a_clear_error(hub, out_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong" + "x" * 20)
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4")
    assert res.exit_code == 2
    assert "checking the token failed, nothing was committed" in res.output and "401" in res.output
    assert "hf_wrongxx" not in res.output
    assert hub.repos == {}


@pytest.mark.parametrize("repo_id", ["no-namespace", "bad//id", "a/b/c", "-lead/x", "tester/has space",
                                     "tester/" + "x" * 100])
def test_invalid_repo_id_refuses_before_any_request(hub, out_dir, monkeypatch, repo_id):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    res = run("publish", out_dir, "--repo-id", repo_id)
    assert res.exit_code == 2
    assert res.output.startswith(f"error: --repo-id {repo_id!r}: expected 'namespace/name'")
    assert len(res.output.strip().splitlines()) == 1  # one clear line
    assert hub.log == []


def test_failure_mid_upload_commits_nothing_and_a_rerun_resumes(hub, out_dir, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    want = expected_files(out_dir)
    gguf_oid = hashlib.sha256(want["model-int4.gguf"]).hexdigest()
    hub.fail.add(("part", gguf_oid, 2))  # the server fails the GGUF's second part once (507: not retried)
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4")
    assert res.exit_code == 2
    assert "error: tester/qnext-int4@main: uploading failed, nothing was committed" in res.output
    assert "507" in res.output and "rerun the same command to resume" in res.output
    assert hub.repos["tester/qnext-int4"]["branches"]["main"] == {} and hub.commits == []  # nothing half-done
    stored = set(hub.objects)
    other_oids = {hashlib.sha256(want[p]).hexdigest() for p in ("onnx/model.onnx", "onnx/model.onnx.data",
                                                                  "quantized/shard-00001.safetensors")}
    assert other_oids <= stored and gguf_oid not in stored  # the other LFS files made it before the failure
    first = len(hub.log)

    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4")
    assert res.exit_code == 0, res.output
    resent = [p for m, p, _ in hub.log[first:] if m == "PUT"]
    assert resent and all(p.startswith(f"/lfs/{gguf_oid}/part/") for p in resent)  # only the missing object
    tree = hub.repos["tester/qnext-int4"]["branches"]["main"]
    assert {k: v for k, v in tree.items() if k != "README.md"} == want  # the final state is complete
    assert_no_token(hub, [tmp_path], res.output, *capfd.readouterr())


def test_report_for_another_artifact_is_refused(hub, out_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    (out_dir / "report-gguf.json").write_text(json.dumps(report_doc("elsewhere/model-q8.gguf", "llama.cpp", 0.01)))
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4")
    assert res.exit_code == 2
    assert "report-gguf.json: validates 'elsewhere/model-q8.gguf' (llama.cpp), which is not an artifact" in res.output
    assert hub.log == []
    # the same name under another backend is another artifact too (a torch report is not an ONNX result)
    (out_dir / "report-gguf.json").write_text(json.dumps(report_doc("model-int4.gguf", "ort", 0.01)))
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4", "--dry-run")
    assert res.exit_code == 2 and "which is not an artifact" in res.output


def test_missing_report_is_refused_unless_allowed(hub, out_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    (out_dir / "reports" / "onnx.json").unlink()
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4")
    assert res.exit_code == 2
    assert "error: no validation report for onnx:" in res.output and "--allow-unvalidated" in res.output
    assert hub.log == []
    # GGUF only: its report exists, so this publishes; the card carries only the GGUF's results
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4", "--include", "gguf")
    assert res.exit_code == 0, res.output
    tree = hub.repos["tester/qnext-int4"]["branches"]["main"]
    assert sorted(tree) == ["LICENSE", "README.md", "model-int4.gguf", "report-gguf.json"]
    card = tree["README.md"].decode()
    assert front_matter(card)["tags"].count("onnx") == 0
    assert "| 0.0042 |" not in card  # the IR's numbers are not claimed for an upload without the IR
    # --allow-unvalidated: the ONNX row says so, with no numbers
    plan = make_plan(out_dir, "tester/qnext-int4", include=["onnx"], allow_unvalidated=True)
    assert "| onnx | - | - | - | - | - | - | - | - | - | not validated |" in plan.card


def test_malformed_report_is_refused(hub, out_dir):
    doc = report_doc("../quantized", "torch", 0.004)
    del doc["metrics"]["kld_mean"]
    (out_dir / "reports" / "ir.json").write_text(json.dumps(doc))
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4", "--dry-run")
    assert res.exit_code == 2
    assert "ir.json: not a valid validation report: report.metrics.kld_mean: missing" in res.output


def test_plain_ir_directory_on_a_branch(hub, pipeline_out, tmp_path, monkeypatch):
    """A plain IR directory is uploaded at the repo's root; --revision creates the branch; --license overrides."""
    monkeypatch.setenv("HF_TOKEN", hub.token)
    ir = tmp_path / "qnext-ir"
    shutil.copytree(pipeline_out / "quantized", ir)
    (ir / "stray.bin").write_bytes(b"not part of the IR")
    res = run("publish", ir, "--repo-id", "tester/qnext-ir", "--revision", "int4", "--private", "--allow-unvalidated",
              "--license", "mit")
    assert res.exit_code == 0, res.output
    repo = hub.repos["tester/qnext-ir"]
    assert repo["private"] and repo["branches"]["main"] == {}
    tree = repo["branches"]["int4"]
    assert sorted(tree) == sorted(["README.md", "LICENSE", "generation_config.json", "graph.json",
                                   "shard-00001.safetensors", "source_config.json"])
    assert tree["graph.json"] == (ir / "graph.json").read_bytes()
    meta = front_matter(tree["README.md"].decode())
    assert meta["license"] == "mit" and meta["library_name"] == "nextq" and "safetensors" in meta["tags"]
    assert "nextq run model --prompt" in tree["README.md"].decode()


def test_non_report_json_under_reports_is_refused(hub, out_dir):
    (out_dir / "reports" / "notes.json").write_text('{"format": "something-else"}')
    res = run("publish", out_dir, "--repo-id", "tester/qnext-int4", "--dry-run")
    assert res.exit_code == 2
    assert "notes.json: format 'something-else', expected 'nextq-validate-report'" in res.output


def test_pipeline_publish_is_the_last_step(hub, tmp_path, monkeypatch):
    """`nextq pipeline SOURCE --publish ID`: the pipeline's own artifacts, reports and card reach the Hub."""
    from conftest import build_checkpoint

    monkeypatch.setenv("HF_TOKEN", hub.token)
    from nextq.pipeline import embedded_model

    src = build_checkpoint(tmp_path / "hf", "base", vocab_size=2048, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32)  # rows of 32: int4 g32 experts fit
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the embedded tokenizer has 2048 ids
        shutil.copy(embedded_model() / f, src / f)
    out = tmp_path / "run"
    res = run("pipeline", src, "-o", out, "--formats", "gguf", "--window", "32", "--max-windows", "1",
              "--max-new-tokens", "2", "--publish", "tester/pipe", env={"NEXTQ_CACHE": str(tmp_path / "cache")})
    assert res.exit_code == 0, res.output + repr(res.exception)
    tree = hub.repos["tester/pipe"]["branches"]["main"]
    assert tree["model.gguf"] == (out / "model.gguf").read_bytes()
    assert "reports/gguf.json" in tree and any(p.startswith("quantized/") for p in tree)
    assert "ir/graph.json" not in tree  # the float original stays local
    assert "quantized" in front_matter(tree["README.md"].decode())["tags"]

"""llama.cpp's command-line tools (`llama-speculative-simple`, `llama-imatrix`, `llama-quantize`, `llama-server`, ...)
built on CPU from the llama.cpp tree of the llama-cpp-python sdist we pin (scripts/llama_cpp_converter.py), as
peers for benchmarks.

    bin_dir = build_tools(["llama-imatrix", "llama-quantize"])    # builds once, cached
    subprocess.run([bin_dir / "llama-quantize", "in.gguf", "out.gguf", "Q4_K_M"])

    python scripts/llama_cpp_tools.py llama-server llama-speculative     # build, print the bin dir

The build is portable (GGML_NATIVE=OFF), static, without curl/OpenSSL, at low priority with 2 jobs (it shares
the machine), and cached under $NEXTQ_CACHE/llama-cpp-tools or ~/.cache/nextq/llama-cpp-tools. One build runs at
a time per cache (a file lock): a second caller waits for it and then reuses what it built. Targets are built one
after the other in the order given; those already built are not rebuilt; new ones extend the same build tree.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_converter  # noqa: E402  (scripts/llama_cpp_converter.py: the pinned llama.cpp sources)

DEFAULT_TARGETS = ("llama-speculative-simple", "llama-imatrix", "llama-quantize", "llama-speculative", "llama-server")
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
                 "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF")


class BuildError(RuntimeError):
    """cmake failed; the message ends with the tail of its output and names the full log."""


def cache_dir() -> Path:
    """$NEXTQ_CACHE/llama-cpp-tools, else $XDG_CACHE_HOME/nextq/llama-cpp-tools, else ~/.cache/nextq/llama-cpp-tools."""
    if os.environ.get("NEXTQ_CACHE"):
        return Path(os.environ["NEXTQ_CACHE"]) / "llama-cpp-tools"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nextq" / "llama-cpp-tools"


def _run_logged(cmd: list[str], log: Path, nice: bool) -> None:
    """Run `cmd`, appending its output to `log`; BuildError with the log's tail on failure."""
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=(lambda: os.nice(10)) if nice else None)
    if r.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise BuildError(f"{cmd[0]} failed ({r.returncode}); full log: {log}\n{tail}")


def build_tools(targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS, cache: Path | None = None,
                jobs: int = 2, nice: bool = True) -> Path:
    """Build the llama.cpp `targets` (cmake target names, e.g. "llama-quantize") once; return the bin dir holding them.

    Sources come from the pinned sdist (downloaded into `cache` on first use). Raises BuildError when cmake fails
    and RuntimeError when the sdist cannot be downloaded.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    build, bin_dir, done = cache / "build", cache / "build" / "bin", cache / "built.txt"

    def missing() -> list[str]:  # targets not yet built to the end (done lists each one once its build returned)
        built = set(done.read_text().split()) if done.is_file() else set()
        return [t for t in targets if t not in built or not (bin_dir / t).is_file()]

    if not missing():  # built earlier: no need to wait for a build of other targets in progress
        return bin_dir
    with (cache / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building into this cache: wait for it
        todo = missing()
        if not todo:
            return bin_dir
        root = llama_cpp_converter.source_root(cache / "src")
        log = cache / "build.log"
        if not (build / "CMakeCache.txt").is_file():
            _run_logged(["cmake", "-S", str(root), "-B", str(build), *CMAKE_OPTIONS], log, nice)
        for t in todo:  # one at a time, in the order asked: the first ones are usable first
            _run_logged(["cmake", "--build", str(build), "-j", str(jobs), "--target", t], log, nice)
            with done.open("a") as f:
                f.write(t + "\n")
    return bin_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", default=list(DEFAULT_TARGETS), help="cmake targets (default: %(default)s)")
    ap.add_argument("--cache", type=Path, default=None, help="cache dir (default: $NEXTQ_CACHE/llama-cpp-tools)")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args()
    print(build_tools(args.targets, args.cache, args.jobs))


if __name__ == "__main__":
    main()

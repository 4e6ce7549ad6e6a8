"""`dspark bench peers`: our server against llama.cpp's on the same GGUF file, in one run.

llama.cpp's `llama-server` is built once from the sources vendored in the `llama-cpp-python`
sdist (cmake, into ~/.cache/dspark/llama.cpp-VERSION), or taken from `--llama-server PATH`.
It runs with the same thread count and one slot per concurrent user (`-np`), `--metrics` on.
Then our server, plain and DSpark scheduled, each started as `dspark bench compare` starts
it. Every server gets the same `bench serve` sweep (same prompts, levels, token counts).
Writes one JSON (with the ratios the issue asks for) and the per-user vs aggregate plot.

    dspark bench peers --prompts ../shared/data/prompts/eval/*.jsonl --concurrency 1,8,32 \\
        --rounds 3 --max-tokens 128
"""

import argparse
import asyncio
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import with_ext
from bench.compare import run_config, save_sweeps
from bench.serve import LevelResult, sweep
from bench.serve import parse_args as parse_serve_args
from engine.loader import default_model_path

LLAMA_CPP_PYTHON = "0.3.36"  # whose vendored llama.cpp is built
OURS = {"ours-plain": "--draft none", "ours-dspark-scheduled": "--draft dspark --num-draft-tokens 7 "
        "--verify-policy scheduled"}


def llama_cache_dir(version: str = LLAMA_CPP_PYTHON) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dspark" / f"llama.cpp-{version}"


def build_llama_server(version: str = LLAMA_CPP_PYTHON, jobs: int | None = None) -> Path:
    """The `llama-server` binary, built on first use (pip download of the sdist, cmake)."""
    root = llama_cache_dir(version)
    binary = root / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", tmp, f"llama-cpp-python=={version}"], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            shutil.rmtree(src, ignore_errors=True)
            shutil.move(str(next(Path(tmp).glob("llama_cpp_python-*/"))), src)
    build = root / "build"
    subprocess.run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build),
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON"],
                   check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "llama-bench",
                    "-j", str(jobs or os.cpu_count() or 1)], check=True)
    if not binary.exists():
        raise FileNotFoundError(f"the build did not produce {binary}")
    return binary


class LlamaServer:
    """`llama-server` on a free loopback port, logging to a file."""

    def __init__(self, binary: Path, model: Path, threads: int, slots: int, ctx_per_slot: int,
                 log_path: Path, extra_args: list[str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - the child writes it until terminate()
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
             "-np", str(slots), "-c", str(slots * ctx_per_slot), "--metrics", *(extra_args or [])],
            stdout=self._log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 120) -> "LlamaServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited:\n{self.log_path.read_text(errors='replace')}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.terminate()
        raise TimeoutError(f"llama-server did not become healthy:\n{self.log_path.read_text(errors='replace')}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def run_llama(binary: Path, sweep_argv: list[str], threads: int, extra_args: list[str]) -> list[LevelResult]:
    args = parse_serve_args(sweep_argv)
    log = Path(tempfile.mkdtemp(prefix="dspark-llama-")) / "llama-server.log"
    print(f"[llama.cpp] {binary} -t {threads} -np {max(args.concurrency)} {shlex.join(extra_args)} (log: {log})",
          file=sys.stderr)
    server = LlamaServer(binary, default_model_path(), threads, max(args.concurrency), 1024, log,
                         extra_args).wait_healthy()
    try:
        return asyncio.run(sweep(server.url, args))[1]
    finally:
        server.terminate()


def _level(levels: list[LevelResult], c: int) -> LevelResult | None:
    return next((lv for lv in levels if lv.concurrency == c), None)


def ratios(results: dict[str, list[LevelResult]], peer: str = "llama.cpp") -> dict[str, dict]:
    """Each of ours against the peer at each level: per-user, aggregate, TTFT p50."""
    out: dict[str, dict] = {}
    for name, levels in results.items():
        if name == peer:
            continue
        for lv in levels:
            base = _level(results[peer], lv.concurrency)
            if base is None:
                continue
            out.setdefault(name, {})[str(lv.concurrency)] = {
                "per_user": lv.median_per_user_tok_s / base.median_per_user_tok_s,
                "aggregate": lv.aggregate_tok_s / base.aggregate_tok_s,
                "ttft_p50": lv.median_ttft_s / base.median_ttft_s}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dspark bench peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", type=Path, default=None,
                    help=f"a llama-server binary (default: built from llama-cpp-python {LLAMA_CPP_PYTHON})")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    # ggml's AMX kernels (the only repacked path for Q4_1) crash on the development VM
    # (SIGSEGV in ggml_backend_amx_mul_mat); without repacking llama.cpp runs its AVX-512 kernels
    ap.add_argument("--llama-args", default="--no-repack", help="extra llama-server flags")
    ap.add_argument("--server-args", default="", help="flags added to each of our servers")
    ap.add_argument("--out", type=Path, default=None)
    args, sweep_argv = ap.parse_known_args(argv)
    binary = args.llama_server or build_llama_server()
    llama_args = shlex.split(args.llama_args)
    results: dict[str, list[LevelResult]] = {"llama.cpp": run_llama(binary, sweep_argv, args.threads, llama_args)}
    for name, flags in OURS.items():
        results[name] = run_config(name, f"{flags} --num-threads {args.threads} {args.server_args}", sweep_argv)
    table = ratios(results)
    configs = {"llama.cpp": f"-t {args.threads} -np <max concurrency> --metrics {args.llama_args}", **OURS}
    out, pngs = save_sweeps("peers", results, args.out, benchmark="serve_peers", llama_server=str(binary),
                            threads=args.threads, configs=configs, ratios_vs_llama_cpp=table)
    print(f"{'server':>22} {'conc':>4} {'agg tok/s':>9} {'user tok/s':>10} {'TTFT p50':>8}")
    for name, levels in results.items():
        for lv in levels:
            print(f"{name:>22} {lv.concurrency:>4} {lv.aggregate_tok_s:>9.1f} "
                  f"{lv.median_per_user_tok_s:>10.1f} {lv.median_ttft_s:>8.2f}")
    for name, levels in table.items():
        for c, r in levels.items():
            print(f"{name} / llama.cpp at c={c}: per-user {r['per_user']:.2f}x, aggregate "
                  f"{r['aggregate']:.2f}x, TTFT p50 {r['ttft_p50']:.2f}x")
    print(f"wrote {with_ext(out, '.json')} and {pngs[0].name}")
    return 0 if all(lv.num_failed == 0 for levels in results.values() for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Loopback load run of the inference API: latency percentiles, throughput, errors, server peak RSS.

Starts `python -m nephrolith.client.serve` on 127.0.0.1 with a free port, sends a
bounded number of POST /v1/predict requests from a fixed number of concurrent
workers, stops the server and writes the results into the API section of
BENCHMARKS.md (between the api-load markers).

Usage:
    .venv/bin/python benchmarks/api_load.py --requests 300 --concurrency 4
    .venv/bin/python benchmarks/api_load.py --checkpoint runs/demo/global --image slice.dcm
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEPHROLITH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DEFAULT_IMAGE = SHARED_DATA / "ct-kidney-islam-subset" / "images" / "Stone" / "Stone- (1).jpg"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
# One BENCHMARKS.md entry per model, between these markers; a rerun replaces its own entry.
START_MARK = "<!-- api-load:{label}:start -->"
END_MARK = "<!-- api-load:{label}:end -->"
BACKBONE_NAMES = {
    "keras": "ConvNeXt-Tiny (keras.applications)",
    "hub": "ConvNeXt-Tiny (TensorFlow Hub)",
    "compact": "compact ConvNeXt",
}
HEADER = (
    "# Benchmarks\n\nMeasured numbers of nephrolith, each with its command, machine and date.\n"
)


def build_checkpoint(folder: Path, kind: str) -> Path:
    """Save a random-init model: "tiny" (compact backbone, 64 px) or "convnext-tiny" (224 px).

    Random weights cost the same time per request as trained ones, and building them
    here keeps the run reproducible without a trained checkpoint or a download.
    """
    from nephrolith.common.runtime import configure_tensorflow

    configure_tensorflow()
    from nephrolith.common import weights
    from nephrolith.common.config import ModelConfig, PreprocessConfig, to_dict
    from nephrolith.common.model import build_model, tiny_model_config

    if kind == "tiny":
        config = tiny_model_config(64)
    else:
        config = ModelConfig(backbone_source="keras", backbone_weights="none", input_size=224)
    model = build_model(config)
    metadata = {
        "preprocess": to_dict(PreprocessConfig(image_size=config.input_size)),
        "threshold": 0.5,
        "provenance": {"trained_on": "nothing (random init, load benchmark)"},
    }
    return weights.save_checkpoint(folder, model, metadata)


def multipart(content: bytes, filename: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    return (
        head + content + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def start_server(checkpoint: Path, threads: int, log_path: Path) -> tuple[subprocess.Popen, int]:
    command = [
        sys.executable,
        "-m",
        "nephrolith.client.serve",
        "--checkpoint",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--threads",
        str(threads),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = re.search(rb"on http://127\.0\.0\.1:(\d+)", log_path.read_bytes())
        if match:
            return process, int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start within 300 s")


def proc_status_kib(pid: int, field: str) -> int:
    """Return a memory field of /proc/<pid>/status (VmHWM = peak RSS, VmRSS = current) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def send(url: str, body: bytes, content_type: str, timeout_s: float) -> tuple[int, float]:
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", content_type)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        status = 0
    return status, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) with linear interpolation between order statistics."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_load(url: str, body: bytes, content_type: str, args: argparse.Namespace) -> dict:
    deadline = time.monotonic() + args.max_seconds
    results: list[tuple[int, float]] = []

    def one(_: int) -> tuple[int, float] | None:
        if time.monotonic() > deadline:
            return None
        return send(url, body, content_type, args.timeout)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        for result in pool.map(one, range(args.requests)):
            if result is not None:
                results.append(result)
    wall_s = time.perf_counter() - started

    latencies_ms = [seconds * 1000 for status, seconds in results if status == 200]
    errors = sum(1 for status, _ in results if status != 200)
    return {
        "requests_sent": len(results),
        "requests_planned": args.requests,
        "errors": errors,
        "status_counts": {
            str(s): sum(1 for r, _ in results if r == s) for s in {r for r, _ in results}
        },
        "wall_s": round(wall_s, 2),
        "req_per_s": round(len(results) / wall_s, 2) if wall_s else 0.0,
        "p50_ms": round(percentile(latencies_ms, 50), 1) if latencies_ms else None,
        "p95_ms": round(percentile(latencies_ms, 95), 1) if latencies_ms else None,
        "max_ms": round(max(latencies_ms), 1) if latencies_ms else None,
        "mean_ms": round(statistics.fmean(latencies_ms), 1) if latencies_ms else None,
    }


def machine() -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_kib = 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        mem_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
    load_1min = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {cores} cores available, 1-min load average {load_1min:.1f} at the start, "
        f"{mem_kib / 2**20:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def markdown(result: dict, command: str, label: str) -> str:
    rows = [
        ("requests (sent / planned)", f"{result['requests_sent']} / {result['requests_planned']}"),
        ("concurrent clients", str(result["concurrency"])),
        ("server threads", str(result["threads"])),
        ("errors (non-200)", str(result["errors"])),
        ("latency p50", f"{result['p50_ms']} ms"),
        ("latency p95", f"{result['p95_ms']} ms"),
        ("latency max", f"{result['max_ms']} ms"),
        ("throughput", f"{result['req_per_s']} req/s over {result['wall_s']} s"),
        ("server peak RSS (VmHWM)", f"{result['peak_rss_mib']} MiB"),
        (
            "server RSS after warm-up / after the run",
            f"{result['rss_warm_mib']} / {result['rss_end_mib']} MiB",
        ),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        f"{START_MARK.format(label=label)}\n"
        f"### Loopback load run of POST /v1/predict ({label})\n\n"
        f"- command: `{command}`\n"
        f"- date: {result['date']}\n"
        f"- machine: {result['machine']}\n"
        f"- model: {result['model']}\n"
        f"- input: {result['input']}\n"
        "- server: waitress on 127.0.0.1, model runs go one batch at a time through the "
        "predictor's model thread; "
        "latency is measured by the client and includes queueing behind other requests.\n"
        f"- warm-up requests not counted: {result['warmup']}\n"
        "- every request runs Grad-CAM (forward and backward pass), which the stone "
        "candidates need, whether or not a heatmap is requested.\n"
        + (f"- note: {result['note']}\n" if result.get("note") else "")
        + "\n"
        "| metric | value |\n|---|---|\n"
        f"{table}\n"
        f"{END_MARK.format(label=label)}"
    )


def write_benchmarks(section: str, label: str) -> None:
    text = BENCHMARKS_MD.read_text(encoding="utf-8") if BENCHMARKS_MD.exists() else HEADER
    start, end = START_MARK.format(label=label), END_MARK.format(label=label)
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + section + after
    else:
        if "## Inference API" not in text:
            text = text.rstrip("\n") + "\n\n## Inference API\n"
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    BENCHMARKS_MD.write_text(text, encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint folder; default: a random-init model built here (see --build)",
    )
    parser.add_argument(
        "--build",
        choices=["tiny", "convnext-tiny"],
        default="tiny",
        help="random-init model built when --checkpoint is not given (default tiny)",
    )
    parser.add_argument(
        "--image", type=Path, default=DEFAULT_IMAGE, help="slice sent in every request"
    )

    # Load shape: a bounded number of requests from a fixed number of clients.
    parser.add_argument("--requests", type=int, default=300, help="requests to send (default 300)")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--threads", type=int, default=4, help="server threads (default 4)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="uncounted requests first (default 5)"
    )
    parser.add_argument("--heatmap", action="store_true", help="request heatmaps (?heatmap=1)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=900.0,
        help="stop sending after this many seconds (default 900)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in s")
    parser.add_argument("--note", default="", help="free text added to the BENCHMARKS.md entry")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")

    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.requests > 100_000:
        parser.error("--requests must be 1..100000 and --concurrency >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.image.is_file():
        print(f"input image not found: {args.image}; pass --image", file=sys.stderr)
        return 1
    host = machine()  # before the run, so the load average shows what else was running
    with tempfile.TemporaryDirectory(prefix="nephrolith-bench-") as tmp:
        tmp_path = Path(tmp)
        checkpoint = args.checkpoint or build_checkpoint(tmp_path / "checkpoint", args.build)
        model = json.loads((checkpoint / "metadata.json").read_text())["model"]
        process, port = start_server(checkpoint, args.threads, tmp_path / "server.log")
        try:
            url = f"http://127.0.0.1:{port}/v1/predict" + ("?heatmap=1" if args.heatmap else "")
            body, content_type = multipart(args.image.read_bytes(), "slice" + args.image.suffix)
            for _ in range(args.warmup):
                send(url, body, content_type, args.timeout)
            rss_warm = proc_status_kib(process.pid, "VmRSS")
            result = run_load(url, body, content_type, args)
            result["peak_rss_mib"] = round(proc_status_kib(process.pid, "VmHWM") / 1024, 1)
            result["rss_warm_mib"] = round(rss_warm / 1024, 1)
            result["rss_end_mib"] = round(proc_status_kib(process.pid, "VmRSS") / 1024, 1)
        finally:
            process.terminate()
            process.wait(60)

    result.update(
        {
            "concurrency": args.concurrency,
            "threads": args.threads,
            "warmup": args.warmup,
            "note": args.note,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": host,
            "model": (
                f"{BACKBONE_NAMES.get(model['backbone_source'], model['backbone_source'])} "
                f"backbone, input {model['input_size']} px, "
                f"{model['embed_dim']}-dim encoder"
                + ("" if args.checkpoint else " (random init, built by the script)")
            ),
            "input": f"{args.image.name} ({args.image.stat().st_size} bytes)"
            + (", heatmap requested" if args.heatmap else ""),
        }
    )
    command = "python benchmarks/api_load.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(json.dumps(result, indent=2))
    if not args.no_write:
        label = f"{model['backbone_source']}-{model['input_size']}px"
        write_benchmarks(markdown(result, command.strip(), label), label)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

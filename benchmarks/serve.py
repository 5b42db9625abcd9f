"""`granite-vision serve` under load: N concurrent clients against one server (requests/s, p50/p95
latency; one request alone for comparison), and `ask --server` against a cold `ask` on the same
picture, in one run (the ratio is what a shell loop over pictures gains).

    python3 benchmarks/serve.py --tiny                          # CPU, the tiny random model
    python3 benchmarks/serve.py --model ibm-granite/granite-vision-3.3-2b --device cuda --clients 1,16,64

Prints a markdown table; --out FILE.json keeps the numbers.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model id or folder")
    parser.add_argument("--tiny", action="store_true", help="build and use the tiny random model (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=32, help="requests per client count")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--picture", type=Path, default=ROOT / "examples" / "chart.png")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="granite-serve-bench-"))
    model = args.model
    if args.tiny or model is None:
        model = subprocess.run(
            [sys.executable, "-m", "granite_cli.tiny_model", str(work / "tiny")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    pictures = _pictures(args.picture, work, args.requests)
    server = subprocess.Popen(
        [sys.executable, "-m", "granite_cli", "serve", "-m", model, "--device", args.device, "--port", "0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = _ready(server)
        rows = [_load(url, pictures, int(clients), args.max_tokens) for clients in args.clients.split(",")]
        cold, warm = _ask_pair(model, url, args.device, pictures[0], args.max_tokens)
    finally:
        server.terminate()
        server.wait(120)
    report = {
        "model": model,
        "device": args.device,
        "max_tokens": args.max_tokens,
        "load": rows,
        "ask": {"cold_s": cold, "server_s": warm, "ratio": round(cold / warm, 1)},
    }
    print(_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(_table(report) + "\n")
    return 0


def _pictures(picture: Path, work: Path, count: int) -> list[str]:
    """`count` different pictures (the example, each shifted a little), as data URLs."""
    base = Image.open(picture).convert("RGB")
    urls = []
    for index in range(count):
        path = work / f"p{index}.png"
        base.rotate(index * 3, expand=False, fillcolor="white").save(path)
        urls.append("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())
    return urls


def _ready(server) -> str:
    for line in server.stderr:
        match = re.search(r"at (http://\S+)/v1 ", line)
        if match:
            return match[1]
    raise SystemExit("the server did not start")


def _ask(url: str, picture: str, max_tokens: int) -> float:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": picture}},
                    {"type": "text", "text": "Describe this image."},
                ],
            }
        ],
        "max_tokens": max_tokens,
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        json.load(response)
    return time.perf_counter() - started


def _load(url: str, pictures: list[str], clients: int, max_tokens: int) -> dict:
    _ask(url, pictures[0], max_tokens)  # warm
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(lambda picture: _ask(url, picture, max_tokens), pictures))
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(pictures),
        "requests_per_s": round(len(pictures) / elapsed, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
    }


def _ask_pair(model: str, url: str, device: str, picture: str, max_tokens: int) -> tuple[float, float]:
    """Seconds of a cold `ask` (a new process loads the model) and of `ask --server`, same picture."""
    path = Path(tempfile.mkdtemp()) / "picture.png"
    path.write_bytes(base64.b64decode(picture.split(",", 1)[1]))
    common = [
        sys.executable,
        "-m",
        "granite_cli",
        "ask",
        str(path),
        "Describe this image.",
        "--max-new-tokens",
        str(max_tokens),
    ]
    times = {}
    for name, extra in (("cold", ["-m", model, "--device", device]), ("server", ["--server", url])):
        started = time.perf_counter()
        subprocess.run([*common, *extra], check=True, capture_output=True)
        times[name] = round(time.perf_counter() - started, 2)
    return times["cold"], times["server"]


def _table(report: dict) -> str:
    lines = [
        f"model {report['model']} on {report['device']}, answers of {report['max_tokens']} tokens at most",
        "",
        "| clients | requests | requests/s | p50 s | p95 s |",
        "|---|---|---|---|---|",
        *(
            f"| {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_s']} | {r['p95_s']} |"
            for r in report["load"]
        ),
        "",
        "cold `ask` {cold_s} s, `ask --server` {server_s} s: {ratio}x".format(**report["ask"]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

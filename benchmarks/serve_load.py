"""Load benchmark of ``serve.py``: flexible vs full under real HTTP load, and SLO mode.

Starts the real server (``serve.py``, loopback only) and drives it with locust, headless,
bounded in requests and time, with the same members and the same labelled test images for
every mode. With two or more cores the server runs on all but the last and locust (and the
batch-1 client) on the last, so the load generator does not measure itself; ``--no-pin``
shares every core. Every fresh server gets a few seconds of untimed load first.

1. throughput and p50 / p99 latency at concurrency 1, 8 and 32 (closed loop), flexible vs
   full, with the server on its own cores and again sharing every core with locust;
   targets at 8: throughput ≥ 2.5× and p99 ≤ 0.5× full's;
2. a ramp of offered load (open loop: Poisson arrivals, see serve_locustfile.py) for full,
   flexible, and flexible with SLO mode; target: where full's p99 passes 2 × SLO, SLO mode keeps
   p99 ≤ SLO, giving up the accuracy its operating points' certificates state;
3. server overhead: batch-1 latency through the server minus ``FlexibleEnsembleModule``
   called in-process on the same decoded images (target ≤ 1.5 ms).

Run: ``python benchmarks/serve_load.py [--data cifar10] [--members-dir DIR]
[--thresholds FILE] [--update-docs]``. Defaults: the CIFAR-10 benchmark members and the
thresholds.json ``python calibrate.py experiment=cifar10`` writes next to them.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from flexens.allocator import retain_freed_memory  # noqa: E402
from flexens.artifacts import replace_marked_section, write_json  # noqa: E402
from flexens.latency import machine_info  # noqa: E402

CONCURRENCY = (1, 8, 32)
RAMP = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""Offered load as multiples of the full ensemble's throughput at concurrency 32."""
RAMP_USERS = 4
"""Locust users of the ramp, each an independent Poisson source (see serve_locustfile.py)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="cifar10")
    parser.add_argument(
        "--members-dir", type=Path, default=ROOT / "outputs/members/cifar10-small_cnn"
    )
    parser.add_argument(
        "--thresholds", type=Path, default=None, help="default: MEMBERS_DIR/thresholds.json"
    )
    parser.add_argument("--images", type=int, default=500, help="test images, cycled")
    parser.add_argument("--seconds", type=float, default=12.0, help="per load level")
    parser.add_argument("--max-requests", type=int, default=6000, help="per load level")
    parser.add_argument("--slo-ms", type=float, default=None, help="default: 4 × full's p50 at 1")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let server and load generator share every core (default: split them)",
    )
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args(argv)
    args.thresholds = args.thresholds or args.members_dir / "thresholds.json"
    args.cpus = set(os.sched_getaffinity(0))
    args.server_cpus, args.client_cpus = cpu_split(args.cpus, args.pin)
    return args


def sharing_cores(args: argparse.Namespace) -> argparse.Namespace:
    """The same settings with server and load generator both on every core."""
    return argparse.Namespace(**{**vars(args), "server_cpus": args.cpus, "client_cpus": args.cpus})


def cpu_split(cpus: set[int], pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """Cores for the server and for the load generator (and this process's client).

    A load generator on the server's cores measures itself as much as the server: each
    request waits for a core behind three processes. With two or more cores the last one
    goes to the client side and the others to the server; ``None`` leaves a side unpinned.
    """
    ordered = sorted(cpus)
    if not pin or len(ordered) < 2:
        return None, None
    return set(ordered[:-1]), {ordered[-1]}


def pinned(cpus: set[int] | None):
    """``preexec_fn`` that moves a child process (and everything it starts) to ``cpus``."""
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


def labelled_images(data: str, count: int, folder: Path) -> list[tuple[str, str]]:
    """``count`` test images as files with their class names, the same for every mode."""
    if data == "digits":
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        out = []
        for i in range(count):
            path = folder / f"digit{i}.png"
            pixels = (255 - digits.images[-1 - i] * 16).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(path)
            out.append((str(path), str(digits.target[-1 - i])))
        return out
    root = ROOT.parent / "shared/data" / data / "test"
    root = Path(os.environ.get("FLEXENS_CIFAR10_ROOT", root.parent)) / "test"
    files = sorted((p, p.parent.name) for p in root.glob("*/*.*"))
    rng = np.random.default_rng(0)
    picks = rng.choice(len(files), size=min(count, len(files)), replace=False)
    return [(str(files[i][0]), files[i][1]) for i in sorted(picks)]


class Server:
    """``serve.py`` in a subprocess on the loopback interface, stopped on exit (or, with
    ``command``, another server on ``args.port``; with ``root``, the ``serve.py`` and
    ``src`` of another checkout, run in this one)."""

    def __init__(
        self,
        args: argparse.Namespace,
        *overrides: str,
        command: list[str] | None = None,
        root: Path = ROOT,
    ) -> None:
        self.url = f"http://127.0.0.1:{args.port}"
        self.log = Path(tempfile.mkdtemp()) / "server.log"
        command = command or [
            sys.executable,
            str(root / "serve.py"),
            f"data={args.data}",
            f"paths.members_dir={args.members_dir}",
            f"serve.thresholds={args.thresholds}",
            f"serve.port={args.port}",
            "serve.threads=1",
            *overrides,
        ]
        path = os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        with self.log.open("w") as sink:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                preexec_fn=pinned(args.server_cpus),
            )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve.py exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"serve.py not healthy:\n{self.log.read_text()}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def output(self) -> str:
        return self.log.read_text()

    def cpu_seconds(self) -> dict[str, float] | None:
        """CPU time so far of the inference workers (spawned) and of the rest of the server
        (the main process and its forks: the HTTP process, LitServe's Manager), from /proc;
        ``None`` where there is no /proc."""
        if not Path("/proc").is_dir():
            return None
        used = {"http": 0.0, "workers": 0.0}
        tick = os.sysconf("SC_CLK_TCK")
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" in command:
                continue
            role = "workers" if b"spawn_main" in command else "http"
            used[role] += (int(stat[11]) + int(stat[12])) / tick
        return used


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def cpu_per_request(server: Server, level: Callable[[], dict]) -> dict:
    """Run one load level and add the server's CPU ms per answered request, by role."""
    before = server.cpu_seconds()
    result = level()
    after = server.cpu_seconds()
    answered = result["requests"] - result["errors"] - result["unanswered"]
    if before is not None and after is not None and answered > 0:
        for role in before:
            result[f"cpu_{role}_ms"] = (after[role] - before[role]) * 1e3 / answered
    return result


def run_locust(
    url: str,
    images_file: Path,
    users: int,
    rate: float,
    args: argparse.Namespace,
    seconds: float | None = None,
) -> dict:
    """One bounded locust run; latency percentiles from exact per-request timings."""
    seconds = seconds or args.seconds
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        env = {
            **os.environ,
            "FLEXENS_LOAD_IMAGES": str(images_file),
            "FLEXENS_LOAD_RATE": str(rate / users if rate else 0),
            "FLEXENS_LOAD_MAX": str(args.max_requests),
            "FLEXENS_LOAD_OUT": str(out),
        }
        command = [
            sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks/serve_locustfile.py"),
            "--headless", "--host", url, "-u", str(users), "-r", str(users),
            "-t", f"{round(seconds)}s", "--only-summary", "--loglevel", "WARNING",
        ]  # fmt: skip
        done = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            preexec_fn=pinned(args.client_cpus),
        )
        if not out.is_file():
            raise RuntimeError(
                f"locust wrote no records:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        records = json.loads(out.read_text())
    return summarise(records, rate)


def summarise(records: list, offered: float) -> dict:
    """Throughput of answered requests; latency percentiles over the answered ones and those
    still waiting when the run ended (status 0), each at its wait so far: leaving the
    slowest out would flatter an overloaded server."""
    start = np.array([r[0] for r in records])
    latency = np.array([r[1] for r in records])
    ok = np.array([r[2] == 200 for r in records])
    waiting = np.array([r[2] == 0 for r in records])
    end = start + latency / 1e3
    span = max(end[ok].max() - start.min(), 1e-9) if ok.any() else float("inf")
    points: dict[str, int] = {}
    for r in records:
        if r[2] == 200:
            points[r[5]] = points.get(r[5], 0) + 1
    timed = latency[ok | waiting] if (ok | waiting).any() else np.array([np.nan])
    return {
        "offered_rps": offered,
        "requests": len(records),
        "errors": int((~ok & ~waiting).sum()),
        "shed": int(sum(r[2] == 503 for r in records)),
        "unanswered": int(waiting.sum()),
        "throughput_rps": float(ok.sum() / span),
        "p50_ms": float(np.percentile(timed, 50)),
        "p99_ms": float(np.percentile(timed, 99)),
        "accuracy": float(np.mean([r[3] for r in records if r[2] == 200] or [np.nan])),
        "avg_members": float(np.mean([r[4] for r in records if r[2] == 200] or [np.nan])),
        "points": points,
    }


def in_process_module(args: argparse.Namespace, images: list[tuple[str, str]]):
    """``FlexibleEnsembleModule`` with the served thresholds, and the images decoded as the
    server's gate decodes them."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from flexens.ensemble import FlexibleEnsembleModule
    from flexens.images import decode_image
    from flexens.inference import load_calibrated_members

    torch.set_num_threads(1)
    members, calibration = load_calibrated_members(args.thresholds, args.members_dir)
    module = FlexibleEnsembleModule(
        [m.network for m in members], calibration.thresholds, calibration.criterion
    ).eval()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("serve", overrides=[f"data={args.data}"])
    transform = instantiate(cfg.data).image_transform()
    chans = members[0].arch.get("in_chans", 3)
    xs = [decode_image(Path(p).read_bytes(), chans, transform, 1 << 24) for p, _ in images]
    return module, xs


BATCH1_ROUNDS = 5
"""Rounds of the batch-1 comparison: each times a slice of the images in-process, then the
same slice through the server, so a drift of the machine's speed hits both alike."""


def batch1_overhead(
    args: argparse.Namespace, url: str, images: list[tuple[str, str]], module, xs
) -> dict:
    """Mean and median ms of ``module`` at batch 1 in-process (on the server's cores, while
    the server idles) and of one request at a time through the server, on the same images
    in the same order, interleaved in :data:`BATCH1_ROUNDS` rounds after 20 untimed each."""
    import torch

    bodies = [Path(p).read_bytes() for p, _ in images]
    times: dict[str, list[float]] = {"module": [], "server": []}
    slices = np.array_split(np.arange(len(images)), BATCH1_ROUNDS)
    with keep_alive(url) as connection:
        for round_, picks in enumerate([np.arange(min(20, len(images))), *slices]):
            with running_on(args.server_cpus), torch.inference_mode():
                in_process = [_timed_call(module, xs[i]) for i in picks]
            through = [round_trip(connection, bodies[i])[0] for i in picks]
            if round_ > 0:  # round 0 warms both up
                times["module"] += in_process
                times["server"] += through
    return {name: timing(seconds) for name, seconds in times.items()}


@contextmanager
def running_on(cpus: set[int] | None):
    """This process on ``cpus`` for the block (``None``: where it already is)."""
    before = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def keep_alive(url: str):
    """One keep-alive connection of the standard library's ``http.client``: a lighter
    client than httpx, since the client's own time is part of every batch-1 figure."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        yield connection
    finally:
        connection.close()


def _timed_call(module, x) -> float:
    """Seconds of one in-process call at batch 1."""
    start = time.perf_counter()
    module(x[None])
    return time.perf_counter() - start


def round_trip(connection: http.client.HTTPConnection, body: bytes) -> tuple[float, bytes]:
    """Seconds of one POST /predict on a keep-alive connection, and the answer's body."""
    start = time.perf_counter()
    connection.request("POST", "/predict", body=body)
    response = connection.getresponse()
    answer = response.read()
    seconds = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"POST /predict answered {response.status}: {answer[:200]!r}")
    return seconds, answer


def timing(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def litserve_floor(args: argparse.Namespace, images: list[tuple[str, str]]) -> dict:
    """Mean and median ms per request of ``serve_echo.py`` (LitServe alone, the same path
    into its workers as ``serve.py``) on the same image bodies, with the same client, one
    at a time after 20 untimed ones."""
    command = [sys.executable, str(ROOT / "benchmarks/serve_echo.py"), str(args.port)]
    bodies = [Path(p).read_bytes() for p, _ in images]
    with Server(args, command=command) as server, keep_alive(server.url) as connection:
        times = [round_trip(connection, body)[0] for body in bodies[:20] + bodies]
    return timing(times[min(20, len(bodies)) :])


WARMUP_S = 3.0
"""Untimed load on every fresh server first: its first batches pay one-off costs."""


def concurrency_sweep(args, images_file: Path, images, batch1: bool = True) -> dict:
    results: dict = {}
    for mode in ("full", "flexible"):
        with Server(args, f"serve.mode={mode}") as server:
            run_locust(server.url, images_file, 8, 0, args, seconds=WARMUP_S)
            if mode == "flexible" and batch1:
                module, xs = in_process_module(args, images)
                pair = batch1_overhead(args, server.url, images, module, xs)
                results["server_batch1_ms"], results["inprocess_batch1_ms"] = (
                    pair["server"],
                    pair["module"],
                )
            for users in CONCURRENCY:
                level = functools.partial(run_locust, server.url, images_file, users, 0, args)
                results[f"{mode}@{users}"] = cpu_per_request(server, level)
                print(mode, users, results[f"{mode}@{users}"], flush=True)
    if batch1:
        results["litserve_floor_ms"] = litserve_floor(args, images)
    return results


def load_ramp(args, images_file: Path, capacity: float, slo_ms: float) -> dict:
    modes = {
        "full": ["serve.mode=full"],
        "flexible": [],
        "flexible+slo": [f"serve.slo_ms={slo_ms:g}"],
    }
    ramp: dict = {}
    for name, overrides in modes.items():
        with Server(args, *overrides) as server:
            run_locust(server.url, images_file, 8, 0, args, seconds=WARMUP_S)
            ramp[name] = []
            for factor in RAMP:
                level = run_locust(server.url, images_file, RAMP_USERS, factor * capacity, args)
                ramp[name].append(level)
                print(name, factor, level, flush=True)
            if name == "flexible+slo":
                ramp["slo_log"] = [
                    line for line in server.output().splitlines() if line.startswith("slo")
                ]
    return ramp


def plot(ramp: dict, capacity: float, slo_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)
    for name in ("full", "flexible", "flexible+slo"):
        offered = [lvl["offered_rps"] for lvl in ramp[name]]
        top.plot(offered, [lvl["p99_ms"] for lvl in ramp[name]], marker="o", label=name)
        bottom.plot(offered, [100 * lvl["accuracy"] for lvl in ramp[name]], marker="o", label=name)
    top.axhline(slo_ms, color="grey", linestyle="--", label=f"SLO {slo_ms:g} ms")
    top.set_yscale("log")
    top.set_ylabel("p99 latency (ms)")
    top.legend()
    bottom.set_ylabel("top-1 accuracy (%)")
    bottom.set_xlabel(f"offered load (requests/s; full's capacity {capacity:.0f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ramp_table(ramp: dict, capacity: float) -> list[str]:
    names = ("full", "flexible", "flexible+slo")
    rows = [
        "| offered req/s | " + " | ".join(f"{n}: p99 ms, answered/s (acc)" for n in names) + " |",
        "|---|---|---|---|",
    ]
    for i, factor in enumerate(RAMP):
        cells = [
            f"{ramp[n][i]['p99_ms']:.0f}, {ramp[n][i]['throughput_rps']:.0f}/s "
            f"({100 * ramp[n][i]['accuracy']:.1f} %)"
            + "".join(
                f", {ramp[n][i][key]} {key}"
                for key in ("shed", "unanswered")
                if ramp[n][i].get(key)
            )
            for n in names
        ]
        rows.append(f"| {factor * capacity:.0f} | " + " | ".join(cells) + " |")
    return rows


def section(
    results: dict, ramp: dict, capacity: float, slo_ms: float, machine: str, placement: str
) -> str:
    split = "sharing_cores" in results
    rows = sweep_rows(results, "its own" if split else "both, shared with the load")
    if split:
        rows += sweep_rows(results["sharing_cores"], "both, shared with the load")
    server, module = results["server_batch1_ms"], results["inprocess_batch1_ms"]
    floor = results["litserve_floor_ms"]
    overhead = server["mean_ms"] - module["mean_ms"]
    overhead_p50 = server["p50_ms"] - module["p50_ms"]
    ramp_rows = ramp_table(ramp, capacity)
    verdict = slo_verdict(ramp, capacity, slo_ms)
    lines = [
        f"Machine: {machine}; one run, `python benchmarks/serve_load.py --update-docs`. Server: "
        "`serve.py` with 1 torch thread per worker, loopback; load: locust (headless) on the "
        f"same machine ({placement}), same test images for every mode.",
        "",
        "| server cores | mode | concurrency | req/s | p50 ms | p99 ms | members | accuracy "
        "| server CPU ms/request: HTTP side + workers |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        sweep_verdict(results, "server on its own core" if split else "server and load sharing"),
        *(
            ["", sweep_verdict(results["sharing_cores"], "server on both cores (load beside it)")]
            if "sharing_cores" in results
            else []
        ),
        "",
        f"Server overhead at batch 1: {server['mean_ms']:.2f} ms mean per request through HTTP "
        f"(`http.client` on one keep-alive connection, one request at a time) vs "
        f"{module['mean_ms']:.2f} ms for `FlexibleEnsembleModule` in-process on the same decoded "
        f"images, same order, the two interleaved in {BATCH1_ROUNDS} rounds: **{overhead:+.2f} "
        f"ms** (target ≤ 1.5 ms: "
        f"{'met' if overhead <= 1.5 else 'not met'}; medians {server['p50_ms']:.2f} vs "
        f"{module['p50_ms']:.2f} ms, {overhead_p50:+.2f} ms). The server's figure includes image "
        "decoding and the client's own time. LitServe alone (`benchmarks/serve_echo.py`: the "
        "same loop, transport, path into the workers and client, an API that answers at once) "
        f"takes {floor['mean_ms']:.2f} ms per request (median {floor['p50_ms']:.2f}), so "
        f"{overhead - floor['mean_ms']:+.2f} ms of the overhead is flexens' own (the gate's "
        "checks, image decoding, the pixels to the worker).",
        "",
        f"Load ramp (open loop: Poisson arrivals at the offered rate from {RAMP_USERS} locust "
        "users, each request sent whether or not earlier ones were answered; p99 counts "
        f"requests still unanswered at the end at their wait so far; a shed request, a 503 "
        f"answered at once, is counted beside it, not in it; SLO {slo_ms:g} ms):",
        "",
        *ramp_rows,
        "",
        verdict,
        "",
        overload_summary(ramp, capacity, slo_ms),
        "",
        "SLO mode's operating points and its switches in this run:",
        "",
        "```",
        *ramp.get("slo_log", []),
        "```",
        "",
        "![p99 and accuracy vs offered load](benchmarks/results/serve_load.png)",
    ]
    return "\n".join(lines)


def sweep_rows(results: dict, cores: str) -> list[str]:
    rows = []
    for mode in ("full", "flexible"):
        for users in CONCURRENCY:
            r = results[f"{mode}@{users}"]
            cpu = (
                f"{r['cpu_http_ms']:.2f} + {r['cpu_workers_ms']:.2f}" if "cpu_http_ms" in r else "–"
            )
            rows.append(
                f"| {cores} | {mode} | {users} | {r['throughput_rps']:.0f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['avg_members']:.2f} | {100 * r['accuracy']:.1f} % | "
                f"{cpu} |"
            )
    return rows


def sweep_verdict(results: dict, where: str) -> str:
    full8, flex8 = results["full@8"], results["flexible@8"]
    gain = flex8["throughput_rps"] / full8["throughput_rps"]
    p99_ratio = flex8["p99_ms"] / full8["p99_ms"]
    return (
        f"{where.capitalize()}, concurrency 8: flexible serves **{gain:.2f}×** full's "
        f"throughput (target ≥ 2.5×: {'met' if gain >= 2.5 else 'not met'}) at "
        f"**{p99_ratio:.2f}×** its p99 (target ≤ 0.5×: {'met' if p99_ratio <= 0.5 else 'not met'})."
    )


def placement(args: argparse.Namespace) -> str:
    """Where server and load generator ran, in words."""
    if args.server_cpus is None:
        return "server and load generator sharing every core"
    cores = ",".join(map(str, sorted(args.server_cpus)))
    return (
        f"server pinned to core {cores}, load generator and batch-1 client to core "
        f"{min(args.client_cpus)}"
    )


def slo_verdict(ramp: dict, capacity: float, slo_ms: float) -> str:
    past = [i for i, lvl in enumerate(ramp["full"]) if lvl["p99_ms"] >= 2 * slo_ms]
    if not past:
        return "Full's p99 never passed 2 × SLO on this ramp: the SLO target was not tested."
    i = past[0]
    slo, full = ramp["flexible+slo"][i], ramp["full"][i]
    met = "met" if slo["p99_ms"] <= slo_ms else "not met"
    return (
        f"At {RAMP[i] * capacity:.0f} req/s full's p99 is {full['p99_ms']:.0f} ms (≥ 2 × SLO); "
        f"flexible with SLO mode keeps **{slo['p99_ms']:.1f} ms** (target ≤ {slo_ms:g} ms: {met}) "
        f"at {100 * slo['accuracy']:.1f} % accuracy vs full's {100 * full['accuracy']:.1f} % on "
        f"these images, serving {slo['points']}."
    )


def overload_summary(ramp: dict, capacity: float, slo_ms: float) -> str:
    """What SLO mode does past full's capacity: p99 of what it answers, and what it sheds."""
    over = [i for i, factor in enumerate(RAMP) if factor > 1.0]
    parts = []
    for i in over:
        level = ramp["flexible+slo"][i]
        shed = level["shed"] / max(level["requests"], 1)
        parts.append(
            f"{RAMP[i] * capacity:.0f} req/s offered: p99 {level['p99_ms']:.0f} ms "
            f"({'within' if level['p99_ms'] <= slo_ms else 'past'} the SLO), "
            f"{level['throughput_rps']:.0f} answered/s, {100 * shed:.0f} % shed"
        )
    return "Past full's capacity, flexible with SLO mode: " + "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    retain_freed_memory()  # as every flexens process runs (flexens.allocator)
    if args.client_cpus is not None:  # this process is a client too (the batch-1 round trips)
        os.sched_setaffinity(0, args.client_cpus)
    load_before = os.getloadavg()[1]
    results_dir = ROOT / "benchmarks/results"
    with tempfile.TemporaryDirectory() as tmp:
        images = labelled_images(args.data, args.images, Path(tmp))
        images_file = Path(tmp) / "images.json"
        images_file.write_text(json.dumps(images))
        results = concurrency_sweep(args, images_file, images)
        if args.server_cpus is not None:  # and as a 2-core server would run, load beside it
            results["sharing_cores"] = concurrency_sweep(
                sharing_cores(args), images_file, images, batch1=False
            )
        capacity = results["full@32"]["throughput_rps"]
        slo_ms = args.slo_ms or round(4 * results["full@1"]["p50_ms"])
        ramp = load_ramp(args, images_file, capacity, slo_ms)
    info = machine_info()
    load = f"{load_before:.1f} before, {os.getloadavg()[1]:.1f} after"
    machine = (
        f"{info['device']}, {info['cpu_count']}-core CPU VM shared with other jobs "
        f"(5-minute load average {load})"
    )
    write_json(
        results_dir / "serve_load.json",
        {
            "machine": machine,
            "placement": placement(args),
            "slo_ms": slo_ms,
            "capacity_full_rps": capacity,
            **results,
            "ramp": ramp,
        },
    )
    plot(ramp, capacity, slo_ms, results_dir / "serve_load.png")
    text = section(results, ramp, capacity, slo_ms, machine, placement(args))
    if args.update_docs:
        replace_marked_section(ROOT / "BENCHMARKS.md", "serve_load", text)
    print(text)


if __name__ == "__main__":
    main()

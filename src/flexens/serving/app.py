"""``serve.py``: check everything, then start LitServe with the gate in front of the worker.

LitServe runs the HTTP server (uvicorn, forked) and the inference workers (spawned, one
per device × ``serve.workers_per_device``) and hands the workers dynamic batches. One HTTP
process serves all requests, so its metrics and SLO controller see every request without
any shared state between processes.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import litserve as ls
import torch
from litserve import server as litserve_server
from PIL import Image

from flexens.calibration.schema import Calibration
from flexens.data.kernels import fast_transform
from flexens.images import decode_image
from flexens.inference import load_calibrated_members
from flexens.latency import resolve_device
from flexens.serving.api import EnsembleAPI
from flexens.serving.gate import RequestGate
from flexens.serving.points import ServingFront
from flexens.serving.settings import ServeSettings
from flexens.serving.slo import SloPolicy
from flexens.serving.transport import FastQueueLitServer, stop_on_signals


@dataclass(frozen=True)
class ServerParts:
    """What :func:`build_server` made, for the caller to run (or inspect)."""

    server: ls.LitServer
    front: ServingFront
    ladder: list


def build_server(settings: ServeSettings, image_transform, in_chans: int, calibration: Calibration):
    """A ready-to-run LitServer; nothing is started."""
    front = ServingFront(
        calibration, settings.limits, settings.default_point, full=settings.mode == "full"
    )
    ladder, policy = [front.default], None
    if settings.slo_ms is not None:
        ladder = front.ladder(list(settings.slo_ladder))
        costs = tuple(p.expected_ms for p in ladder)
        policy = SloPolicy(settings.slo_ms, costs, **settings.slo)
    decode = functools.partial(
        decode_image,
        in_chans=in_chans,
        transform=fast_transform(image_transform),
        max_pixels=settings.max_pixels,
    )
    gate = {
        "front": front,
        "decode": decode,
        "max_body_bytes": settings.max_body_bytes,
        "max_in_flight": settings.max_in_flight,
        "num_members": len(calibration.members),
        "ladder": ladder,
        "slo_policy": policy,
        "api_key": litserve_server.LIT_SERVER_API_KEY or None,  # LitServe's own reading
    }
    device = resolve_device(settings.device)
    graphs = settings.cuda_graphs and device.type == "cuda"
    api = EnsembleAPI(
        settings.thresholds,
        settings.members_dir,
        settings.mode,
        settings.threads,
        settings.max_batch_size,
        settings.batch_timeout,
        cuda_graphs=graphs,
        input_shape=served_input_shape(decode) if graphs else None,
    )
    server = FastQueueLitServer(
        api,
        accelerator="cuda" if device.type == "cuda" else "cpu",
        workers_per_device=settings.workers_per_device,
        timeout=settings.timeout,
        fast_queue=settings.fast_queue,
        front_door=(RequestGate, gate),
        model_metadata={"ensemble": calibration.ensemble, "criterion": calibration.criterion},
    )
    return ServerParts(server, front, ladder)


def served_input_shape(decode) -> tuple[int, ...]:
    """The shape the gate decodes an image to, read off a blank one: the evaluation
    transforms end at a fixed size, so every request's input has it, and the workers capture
    their CUDA graphs for it before the first request (another shape is captured when it
    first arrives)."""
    blank = io.BytesIO()
    Image.new("RGB", (64, 64)).save(blank, "PNG")
    return tuple(decode(blank.getvalue()).shape)


def serve(settings: ServeSettings, image_transform) -> None:
    """Load and check the ensemble, then answer requests until interrupted."""
    members, calibration = load_calibrated_members(
        settings.thresholds, settings.members_dir, "serve.thresholds"
    )  # the checks infer.py makes, before any process starts
    in_chans = members[0].arch.get("in_chans", 3)
    del members  # the workers load their own copies
    parts = build_server(settings, image_transform, in_chans, calibration)
    torch.set_num_threads(1)  # the HTTP process decodes one image at a time
    point = parts.front.default
    print(f"serving {calibration.ensemble} ({settings.mode}) at operating point {point.name}")
    print(point.describe())
    if len(parts.ladder) > 1:
        print(f"slo mode: p99 <= {settings.slo_ms:g} ms, stepping along")
        for level, step in enumerate(parts.ladder):
            print(f"slo ladder {level}: {step.describe()}")
    stop_on_signals()
    url = f"http://{settings.host}:{settings.port}"
    print(f"POST {url}/predict  GET {url}/health  GET {url}/metrics", flush=True)
    parts.server.run(
        host=settings.host,
        port=settings.port,
        num_api_servers=1,
        generate_client_file=False,
        log_level="warning",
    )

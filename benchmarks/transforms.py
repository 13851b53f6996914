"""Data transforms: torchvision's v2 pipelines against ``fast_transform``, on CIFAR-10 images.

Three paths an image takes through flexens, each timed per image with the data module's v2
pipeline and with :func:`flexens.data.kernels.fast_transform` of it, interleaved in rounds
(``flexens.latency.interleaved``) so the machine's drift hits both alike, on one torch
thread (the server's HTTP process and the training loader run in one thread each):

- a request's decoding in the server (``flexens.images.decode_image``: header check, PIL
  decode, mode conversion, the evaluation transform) on the test JPEGs;
- a training sample's augmentation (random crop with padding, flip, scaling, normalising)
  on the decoded uint8 images, as the training loader applies it;
- an evaluation sample of the decoded split (scaling, normalising), as calibration's and
  ``infer.py``'s loaders apply it.

Every output is compared bit for bit; the training path from the same seed, so that the
random draws must match too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from flexens.artifacts import replace_marked_section, write_json  # noqa: E402
from flexens.latency import interleaved, machine_info  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT.parent / "shared/data/cifar10")
    parser.add_argument("--images", type=int, default=1000, help="test images used")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per image and form")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/transforms.json")
    parser.add_argument("--update-docs", action="store_true")
    return parser.parse_args(argv)


def same_outputs(forms: dict, inputs: list, seeded: bool) -> bool:
    """Whether both forms give identical tensors on every input (from one seed each)."""
    import torch

    outputs = []
    for transform in forms.values():
        torch.manual_seed(0)
        outputs.append([transform(x) for x in inputs] + ([torch.rand(4)] if seeded else []))
    return all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))


def time_forms(forms: dict, inputs: list, rounds: int) -> dict[str, dict]:
    """Mean and median µs per call of each form, each input timed in its own rounds."""
    times: dict[str, list[float]] = {name: [] for name in forms}
    for seed, x in enumerate(inputs):
        fns = {name: (lambda t=t, x=x: t(x)) for name, t in forms.items()}
        for name, seconds in interleaved(fns, rounds, seed=seed).items():
            times[name] += list(seconds)
    return {
        name: {"mean_us": float(np.mean(t) * 1e6), "p50_us": float(np.median(t) * 1e6)}
        for name, t in times.items()
    }


def main(argv: list[str] | None = None) -> None:
    import functools

    import torch
    from torchvision.transforms import v2

    from flexens.data import ImageFolderDataModule
    from flexens.data.kernels import fast_transform
    from flexens.images import decode_image

    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    files = sorted((args.root / "test").glob("*/*.jpg"))
    picks = np.random.default_rng(0).choice(len(files), min(args.images, len(files)), False)
    bodies = [files[i].read_bytes() for i in sorted(picks)]
    data = ImageFolderDataModule(root=str(args.root), preset="cifar", image_size=32)
    evaluation = data.image_transform()
    decoded = [v2.functional.pil_to_tensor(image).contiguous() for image in _pil(bodies)]

    def decoding(transform):
        return functools.partial(decode_image, in_chans=3, transform=transform, max_pixels=1 << 24)

    paths = {
        "request decoding (server)": (
            {"v2": decoding(evaluation), "fast": decoding(fast_transform(evaluation))},
            bodies,
            False,
        ),
    }
    for label, augment in (("training sample", True), ("evaluation sample", False)):
        stages = v2.Compose(data.tensor_stages(augment=augment))
        paths[f"{label} (decoded split)"] = (
            {"v2": stages, "fast": fast_transform(stages)},
            decoded,
            augment,
        )
    result = {"machine": machine_info(), "images": len(bodies), "rounds": args.rounds, "paths": {}}
    for label, (forms, inputs, seeded) in paths.items():
        result["paths"][label] = {
            **time_forms(forms, inputs, args.rounds),
            "identical": same_outputs(forms, inputs, seeded),
        }
    result["seconds"] = time.perf_counter() - started
    write_json(args.out, result)
    text = section(result)
    if args.update_docs:
        replace_marked_section(ROOT / "BENCHMARKS.md", "transforms", text)
    print(text)


def _pil(bodies: list[bytes]) -> list:
    import io

    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in bodies]


def section(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['device']}, {m['cpu_count']} cores, torch {m['torch']}, 1 torch thread; "
        f"{m['date']}. Command: `python benchmarks/transforms.py --update-docs` "
        f"({result['seconds']:.0f} s). {result['images']} CIFAR-10 test images, each timed "
        f"{result['rounds']} times per form, the two forms interleaved.",
        "",
        "| path | v2 pipeline µs (mean / p50) | `fast_transform` µs (mean / p50) | faster "
        "| identical outputs |",
        "|---|---:|---:|---:|---|",
    ]
    for label, r in result["paths"].items():
        old, new = r["v2"], r["fast"]
        lines.append(
            f"| {label} | {old['mean_us']:.0f} / {old['p50_us']:.0f} | "
            f"{new['mean_us']:.0f} / {new['p50_us']:.0f} | "
            f"{old['mean_us'] / new['mean_us']:.2f}× | {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

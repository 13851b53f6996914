"""Request decoding: the v2 pipeline against its kernel form, on real CIFAR-10 JPEGs.

What the server's HTTP process spends per request on turning the body into the model's
input (``flexens.images.decode_image``: header check, PIL decode, mode conversion, the
data module's evaluation transform), with the transform run as the v2 pipeline and as
:func:`flexens.data.kernels.fast_transform` makes it. One torch thread, as in the HTTP
process; each image decoded both ways in the same round, rounds in a fresh random order
(``flexens.latency.interleaved``), so the machine's drift hits both alike. Every output is
also compared bit for bit.
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
    parser.add_argument("--images", type=int, default=1000, help="test images decoded")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per image and form")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/decode.json")
    parser.add_argument("--update-docs", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

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
    forms = {"v2 pipeline": data.image_transform()}
    forms["kernels"] = fast_transform(forms["v2 pipeline"])
    limit = 1 << 24
    identical = all(
        torch.equal(
            decode_image(b, 3, forms["kernels"], limit),
            decode_image(b, 3, forms["v2 pipeline"], limit),
        )
        for b in bodies
    )
    times: dict[str, list[float]] = {name: [] for name in forms}
    for seed, body in enumerate(bodies):
        fns = {
            name: (lambda t=t, b=body: decode_image(b, 3, t, limit)) for name, t in forms.items()
        }
        for name, seconds in interleaved(fns, args.rounds, seed=seed).items():
            times[name] += list(seconds)
    result = {
        "machine": machine_info(),
        "images": len(bodies),
        "rounds": args.rounds,
        "identical": identical,
        **{
            name: {"mean_us": float(np.mean(t) * 1e6), "p50_us": float(np.median(t) * 1e6)}
            for name, t in times.items()
        },
        "seconds": time.perf_counter() - started,
    }
    write_json(args.out, result)
    text = section(result)
    if args.update_docs:
        replace_marked_section(ROOT / "BENCHMARKS.md", "decode", text)
    print(text)


def section(result: dict) -> str:
    m = result["machine"]
    old, new = result["v2 pipeline"], result["kernels"]
    return (
        f"Machine: {m['device']}, {m['cpu_count']} cores, torch {m['torch']}, 1 torch thread; "
        f"{m['date']}. Command: `python benchmarks/decode.py --update-docs` "
        f"({result['seconds']:.0f} s).\n\n"
        f"{result['images']} CIFAR-10 test JPEGs, each decoded {result['rounds']} times per form, "
        "interleaved:\n\n"
        "| transform | mean µs per request | p50 µs |\n|---|---:|---:|\n"
        f"| v2 pipeline | {old['mean_us']:.0f} | {old['p50_us']:.0f} |\n"
        f"| kernels (`fast_transform`) | {new['mean_us']:.0f} | {new['p50_us']:.0f} |\n\n"
        f"**{old['mean_us'] / new['mean_us']:.2f}×** faster at the mean, "
        f"{old['mean_us'] - new['mean_us']:.0f} µs less per request; outputs bit for bit "
        f"identical on every image: {result['identical']}."
    )


if __name__ == "__main__":
    main()

"""Sweep the launch parameters of the Triton kernels on the current GPU (a developer tool).

    python -m memzoo.bench.tune [--preset 350m]

Times each registered kernel on the preset for every candidate block size / tile shape and
prints the medians; the chosen values are then written into the kernel modules by hand.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch

from memzoo.bench.presets import PRESETS
from memzoo.bench.timing import median, time_call
from memzoo.bench.kernel_cases import KERNELS, clone_case


def _time(pair, case, device: torch.device, iters: int) -> float:
    work = clone_case(case)
    _, times = time_call(functools.partial(pair.triton(), *work.args, **work.kwargs), device, warmup=3, iters=iters)
    return median(times) * 1e3


TILE_CANDIDATES = ((64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (128, 128, 64, 8, 3),
                   (64, 64, 32, 4, 4), (128, 256, 32, 8, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="350m", choices=sorted(PRESETS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--kernels", default="lion,adamw,galore", help="comma-separated: lion, adamw, galore")
    args = parser.parse_args()
    which = set(args.kernels.split(","))
    device = torch.device("cuda")
    named = PRESETS[args.preset].shapes()
    shapes = [shape for _, shape in named]
    projected = [shape for name, shape in named if ("attn" in name or "mlp" in name) and len(shape) == 2]
    generator = torch.Generator().manual_seed(0)

    from memzoo.triton_kernels import galore, lion

    print("kernel, setting, dtypes, ms")
    for state in (None, torch.bfloat16) if "lion" in which else ():
        pair = KERNELS["lion.lion_update_"]
        case = pair.make_case(shapes, {"param": torch.float32, "state": state}, device, generator, pair.bench_hparams)
        for block, warps in itertools.product((512, 1024, 2048, 4096), (4, 8, 16)):
            lion.BLOCK, lion.NUM_WARPS = block, warps
            print(f"lion, BLOCK={block} warps={warps}, state={state}, {_time(pair, case, device, args.iters):.3f}",
                  flush=True)
        del case
    if "adamw" in which:
        pair = KERNELS["galore.adamw_update_"]
        case = pair.make_case(shapes, {"param": torch.float32, "state": None}, device, generator, pair.bench_hparams)
        for block, warps in itertools.product((512, 1024, 2048), (4, 8)):
            galore.ADAMW_BLOCK, galore.ADAMW_WARPS = block, warps
            print(f"adamw, BLOCK={block} warps={warps}, fp32, {_time(pair, case, device, args.iters):.3f}", flush=True)
        del case
    if "galore" not in which:
        return
    # Both kernels over every projected matrix, each side; a setting's score is the sum over sides.
    for name, attribute in (("galore.galore_adam_project_", "PROJECT_TILES"), ("galore.galore_apply_", "APPLY_TILES")):
        pair = KERNELS[name]
        totals = {tiles: 0.0 for tiles in TILE_CANDIDATES}
        for side in ("right", "left"):
            hparams = {**pair.bench_hparams, "side": side}
            case = pair.make_case(projected, {"param": torch.float32, "state": None}, device, generator, hparams)
            for tiles in TILE_CANDIDATES:
                setattr(galore, attribute, galore.Tiles(*tiles))
                try:
                    ms = _time(pair, case, device, args.iters)
                except Exception as exc:  # e.g. out of shared memory for the largest tiles
                    ms = float("inf")
                    print(f"{name} {side}, {tiles}: {type(exc).__name__}", flush=True)
                totals[tiles] += ms
                print(f"{name} {side}, {tiles}, fp32, {ms:.3f}", flush=True)
            del case
        best = min(totals, key=totals.get)
        print(f"BEST {attribute} {','.join(map(str, best))} {totals[best]:.3f}", flush=True)


if __name__ == "__main__":
    main()

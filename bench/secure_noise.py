"""Cost of secure DP noise (``SecureGaussian.privatise``: ChaCha20, Box-Muller, the noisy sum
rounded to a grid exactly as ideal noise would give it) against torch's generator plus an addition.

Every DP step adds one Gaussian value to each trainable parameter's clipped sum. Timed per call
on ``--params`` values (interleaved, CPU time on a CPU, wall time on CUDA), with the
trainable-subset sizes of the s1 LoRA configs as defaults; ``bench.dp_step``'s ``secure``
variant times it inside a step. On an accelerator the arithmetic runs on the device, and each
size's release is also checked to be identical to the CPU's (the same ideal grid points).
Run: ``python -m bench.secure_noise`` (``--device cuda`` in ``bench/gpu.sh``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import host, interleaved, table, timing_key, write_json
from fedvox.shared.privacy.noise import SecureGaussian


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (ChaCha20 itself runs on one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    key = timing_key(device)
    rows, results = [], []
    for count in args.params:
        generator = torch.Generator(device=device).manual_seed(0)
        secure = SecureGaussian(bytes(32))
        summed = torch.randn(count, generator=generator, device=device)  # a clipped sum's scale
        timed = interleaved(
            {
                "torch": lambda generator=generator, summed=summed: torch.normal(
                    0.0, 1.0, summed.shape, generator=generator, device=device
                ).add_(summed),
                "chacha20": lambda secure=secure, summed=summed: secure.privatise(summed, 1.0),
            },
            args.repeats,
            device,
        )
        torch_s, secure_s = timed["torch"][key], timed["chacha20"][key]
        release = SecureGaussian(bytes(32)).privatise(summed, 1.0).cpu()
        identical = torch.equal(release, SecureGaussian(bytes(32)).privatise(summed.cpu(), 1.0))
        results.append({"params": count, **timed, "same_as_cpu": identical})
        rows.append(
            (f"{count:,}", f"{torch_s * 1e3:.1f}", f"{secure_s * 1e3:.1f}", f"{secure_s / torch_s:.1f}x", identical)
        )
    path = write_json({"host": host(device), "timing": key, "results": results}, args.out, "secure_noise")
    print(table(("values per call", f"torch ms ({key})", "privatise ms", "ratio", "same as the CPU's"), rows))
    print(f"written to {path}")


if __name__ == "__main__":
    main()

"""Cost of secure DP noise (``SecureGaussian.privatise``: ChaCha20, Box-Muller, the noisy sum
rounded to a grid exactly as ideal noise would give it) against torch's generator plus an addition.

Every DP step adds one Gaussian value to each trainable parameter's clipped sum. Timed per call
on ``--params`` values (interleaved, CPU time on a CPU), with the trainable-subset sizes of the
s1 LoRA configs as defaults, and the share of a DP step it adds is ``docs/performance.md``'s
figure 1 divided by these. Run: ``python -m bench.secure_noise``.
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
        results.append({"params": count, "torch": timed["torch"], "chacha20": timed["chacha20"]})
        rows.append((f"{count:,}", f"{torch_s * 1e3:.1f}", f"{secure_s * 1e3:.1f}", f"{secure_s / torch_s:.1f}x"))
    path = write_json({"host": host(device), "timing": key, "results": results}, args.out, "secure_noise")
    print(table(("values per call", f"torch ms ({key})", "privatise ms", "ratio"), rows))
    print(f"written to {path}")


if __name__ == "__main__":
    main()

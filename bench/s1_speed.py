"""s1 speed on this machine: DP training steps (Opacus hooks) and KV-cache generation (tokens/s).

    python -m bench.s1_speed --config tiny --threads 1
    python -m bench.s1_speed --config v2 --threads 1 --new-tokens 200 --skip-train

Prints one JSON object. Each figure is the median of ``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import typer
from opacus import GradSampleModule

from fedvox.client.host import prepare_training_process
from fedvox.shared.cli import run_cli
from fedvox.shared.models.batches import S1Batch
from fedvox.shared.models.config import EOS, s1_config
from fedvox.shared.models.s1 import Text2SemanticDecoder, generate, s1_loss

app = typer.Typer(add_completion=False)


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batch(batch_size: int, phonemes: int, tokens: int, vocab: int) -> S1Batch:
    return S1Batch(
        phoneme_ids=torch.randint(1, vocab, (batch_size, phonemes)),
        phoneme_lengths=torch.full((batch_size,), phonemes),
        bert_features=torch.randn(batch_size, phonemes, 1024),
        semantic_ids=torch.randint(0, EOS, (batch_size, tokens)),
        semantic_lengths=torch.full((batch_size,), tokens),
    )


@app.command()
def main(
    config: str = typer.Option("tiny", help="s1 config: tiny, v1, v2, v2Pro, v2ProPlus"),
    threads: int = typer.Option(1, help="torch CPU threads"),
    batch_size: int = typer.Option(8, help="training batch size"),
    phonemes: int = typer.Option(40, help="phonemes per utterance (training and generation)"),
    tokens: int = typer.Option(150, help="semantic tokens per training utterance (6 s)"),
    prompt: int = typer.Option(100, help="reference prompt tokens for generation (4 s)"),
    new_tokens: int = typer.Option(200, help="tokens generated (EOS barred, so exactly this many)"),
    repeats: int = typer.Option(3, help="timed runs per figure"),
    skip_train: bool = typer.Option(False, help="only measure generation"),
) -> None:
    logging.disable(logging.WARNING)  # generation warns that it stopped without EOS, by design
    warnings.filterwarnings("ignore", message="Full backward hook")  # Opacus, harmless
    prepare_training_process(threads)  # as every training process (client.host)
    torch.manual_seed(0)
    cfg = s1_config(config)
    model = Text2SemanticDecoder(cfg)
    result: dict[str, object] = {"config": config, "threads": threads}
    if not skip_train:
        batch = _batch(batch_size, phonemes, tokens, cfg.phoneme_vocab_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for mode, module in (
            ("plain", model),
            ("opacus_hooks", GradSampleModule(model, loss_reduction="sum")),
        ):

            def step(module: torch.nn.Module = module) -> None:
                optimizer.zero_grad(set_to_none=True)
                s1_loss(module, batch).per_sample.sum().backward()
                optimizer.step()
                for param in model.parameters():
                    param.grad_sample = None

            result[f"train_step_s_{mode}"] = round(_median_seconds(step, repeats), 4)
            if isinstance(module, GradSampleModule):
                module._close()
        result["train_batch"] = {"batch_size": batch_size, "phonemes": phonemes, "tokens": tokens}
    model.eval()
    text = torch.randint(1, cfg.phoneme_vocab_size, (phonemes,))
    reference = torch.randint(0, EOS, (prompt,))
    seconds = _median_seconds(
        lambda: generate(
            model,
            text,
            None,
            reference,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            generator=torch.Generator().manual_seed(0),
        ),
        repeats,
    )
    result["generate"] = {
        "prompt": prompt,
        "new_tokens": new_tokens,
        "tokens_per_s": round(new_tokens / seconds, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(app)

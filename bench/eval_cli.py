"""`slos-serve sim`, `bench tune`, `bench capacity` and `bench replicas`: the paper's evaluation
in the simulator, printed as the Markdown tables `docs/benchmarks.md` quotes, with JSON and
plots where asked."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.experiments import (
    STEADY_ARRIVALS,
    STEADY_S,
    CapacityRow,
    Knobs,
    Variant,
    Window,
    capacity_per_gpu,
    capacity_row,
    geomean,
    interval,
    knob_grid,
    run_parallel,
    search,
    setup,
    tightest_tpot_s,
)
from planner.policies.registry import ALL_NAMES
from shared.roofline import SHIPPED_PROFILES, load_profile

console = Console(stderr=True)
A100 = SHIPPED_PROFILES / "a100-80gb_llama-2-7b.json"
Profile_ = Annotated[Path, typer.Option("--profile", help="GPU profile")]
Budget = Annotated[int | None, typer.Option(help="tokens a step carries: Sarathi's and EDF's chunk budget, FCFS's "
                                            "and DistServe's batched prompt tokens (default 512 / 4,096)")]
MaxSeqs = Annotated[int, typer.Option(help="sequences a step holds at most")]
PrefillGPUs = Annotated[int | None, typer.Option(help="DistServe's prefill GPUs (default half)")]
SpecLen = Annotated[int, typer.Option(help="a baseline's fixed speculative length (n-gram); 0: none")]
Duration = Annotated[float, typer.Option(help="seconds of arrivals per simulated run, at least")]
MinArrivals = Annotated[int, typer.Option(help="arrivals per simulated run, at least")]
Jobs = Annotated[int, typer.Option(help="simulations run at once, one process each")]
Objectives = Annotated[str, typer.Option(help="ours, or the paper's where it gives them (coding, summarization)")]
Acceptance = Annotated[float | None, typer.Option(help="per-token acceptance of speculative tokens for every request "
                                                  "(default: the scenario's)")]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, redirect_stdout=False)


def _seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",")]


def _scenarios(text: str) -> list[str]:
    from bench.workloads import SCENARIOS

    return list(SCENARIOS) if text == "all" else text.split(",")


def sim(
    scenario_name: Annotated[str, typer.Option("--scenario", help="chatbot, coding, summarization, mixed, "
                                               "tool_calling or reasoning")] = "mixed",
    rate: Annotated[float, typer.Option(help="requests per second")] = 4.0,
    duration: Annotated[float, typer.Option(help="seconds of arrivals")] = 60.0,
    policy: Annotated[str, typer.Option(help="slos, fcfs, sarathi, distserve, edf or an slos ablation")] = "slos",
    gpus: Annotated[int, typer.Option(help="GPUs (DistServe splits them into pools)")] = 1,
    bursty: Annotated[bool, typer.Option(help="the bursty variant")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    budget: Budget = None,
    max_seqs: MaxSeqs = 256,
    prefill_gpus: PrefillGPUs = None,
    spec_len: SpecLen = 0,
    acceptance: Acceptance = None,
    objectives: Objectives = "ours",
    profile: Profile_ = A100,
) -> None:
    """Simulate one scenario with the planner's real code and print SLO attainment per class."""
    from bench.simulator import simulate
    from shared.slo import DEFAULT_CLASSES

    prof = load_profile(profile)
    s = setup(policy, prof, gpus, Knobs(budget, max_seqs, prefill_gpus, spec_len))
    arrivals = Variant(bursty, acceptance, objectives).arrivals(scenario_name, prof, rate, duration, seed)
    started = time.perf_counter()
    result = simulate(s.make(), s.cluster, arrivals, DEFAULT_CLASSES, seed=seed)
    wall = time.perf_counter() - started
    done = [o for o in result.outcomes if o.finished]
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    print(f"{len(result.outcomes)} requests, {sum(o.refused for o in result.outcomes)} refused; "
          f"SLO attainment {result.attainment:.1%} "
          + ", ".join(f"{c} {a:.1%}" for c, a in result.by_class().items()))
    if ttft:
        print(f"TTFT p50 {np.percentile(ttft, 50) * 1e3:.0f} ms, p99 {np.percentile(ttft, 99) * 1e3:.0f} ms; "
              f"simulated {result.end:.0f} s in {result.planner_calls} planner calls "
              f"({result.planner_s / max(1, result.planner_calls) * 1e3:.2f} ms each)")
    print("by the planner's count: " + ", ".join(f"{kind} {met} met of {total}"
                                                 for kind, (met, total) in sorted(result.promises.items())))
    print(f"simulation took {wall:.1f} s, of which the planner {result.planner_s:.1f} s")


def bench_tune(
    scenarios: Annotated[str, typer.Option(help="comma-separated, or all")] = "all",
    policies: Annotated[str, typer.Option(help="comma-separated baselines")] = "fcfs,sarathi,distserve,edf",
    gpus: Annotated[int, typer.Option(help="GPUs each policy gets (DistServe splits them)")] = 2,
    duration: Duration = STEADY_S,
    min_arrivals: MinArrivals = STEADY_ARRIVALS,
    seed: Annotated[int, typer.Option(help="the tuning seed (evaluate on others)")] = 0,
    quick: Annotated[bool, typer.Option(help="a smaller grid")] = False,
    start: Annotated[float, typer.Option(help="rate per GPU each search starts from")] = 4.0,
    splits: Annotated[int, typer.Option(help="bisection steps once the capacity is bracketed")] = 4,
    jobs: Jobs = 2,
    out: Annotated[Path, typer.Option(help="JSON of the chosen knobs, for bench capacity --tuned")] = Path(
        "tuned-knobs.json"),
    profile: Profile_ = A100,
) -> None:
    """Tune each baseline's knobs per scenario on one seed, as its authors would deploy it:
    capacity for every setting of the grid; the best is written to `out`."""
    prof = load_profile(profile)
    window = Window(duration, min_arrivals)
    chosen: dict[str, dict[str, dict]] = {}
    logging.disable(logging.WARNING)  # promises missed in overload: counted, not news
    print(f"Tuning on seed {seed}: {prof.model.name} on {prof.hardware}, {gpus} GPUs, windows of "
          f"{duration:.0f} s and {min_arrivals} arrivals at least; capacity per GPU")
    print("| scenario | policy | knobs | capacity |")
    print("|---|---|---|---|")
    for name in _scenarios(scenarios):
        tpot = tightest_tpot_s(name, prof, seed)
        grid = [(p, k) for p in policies.split(",") for k in knob_grid(p, prof, gpus, tpot, quick)]
        calls = [(p, k, prof, gpus, name, window, Variant(), start, seed, splits) for p, k in grid]
        with _progress() as bar:
            task = bar.add_task(f"tuning {name}", total=len(calls))
            caps = [c for c, _ in run_parallel(capacity_per_gpu, calls, jobs, lambda: bar.advance(task))]
        for policy in policies.split(","):
            tried = [(cap, k) for (p, k), cap in zip(grid, caps) if p == policy]
            for cap, k in tried:
                print(f"| {name} | {policy} | {k.label()} | {cap:.2f} |")
            cap, best = max(tried, key=lambda t: t[0])  # the first of equals: the grid's order
            chosen.setdefault(name, {})[policy] = asdict(best)
            print(f"| {name} | **{policy}** | **{best.label()}** | **{cap:.2f}** |", flush=True)
    out.write_text(json.dumps(chosen, indent=1) + "\n")
    console.print(f"chosen knobs written to {out}")


def _load_tuned(path: Path | None) -> dict[str, dict[str, Knobs]]:
    if path is None:
        return {}
    raw = json.loads(path.read_text())
    return {name: {p: msgspec.convert(k, Knobs) for p, k in by_policy.items()} for name, by_policy in raw.items()}


def _cell(values: list[float]) -> str:
    mean, lo, hi = interval(values)
    return f"{mean:.2f}" if math.isnan(lo) else f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def bench_capacity(
    scenarios: Annotated[str, typer.Option(help="comma-separated, or all")] = "all",
    policies: Annotated[str, typer.Option(help=f"comma-separated, of: {', '.join(ALL_NAMES)}")] = (
        "slos,fcfs,sarathi,distserve,edf"),
    gpus: Annotated[int, typer.Option(help="GPUs each policy gets (DistServe splits them)")] = 2,
    duration: Duration = STEADY_S,
    min_arrivals: MinArrivals = STEADY_ARRIVALS,
    seeds: Annotated[str, typer.Option(help="comma-separated held-out seeds")] = "1,2,3,4,5",
    tuned: Annotated[Path | None, typer.Option(help="the baselines' knobs per scenario (bench tune)")] = None,
    budget: Budget = None,
    max_seqs: MaxSeqs = 256,
    prefill_gpus: PrefillGPUs = None,
    spec_len: SpecLen = 0,
    bursty: Annotated[bool, typer.Option(help="the bursty variant of each scenario")] = False,
    acceptance: Acceptance = None,
    objectives: Objectives = "ours",
    start: Annotated[float, typer.Option(help="rate per GPU the search starts from")] = 4.0,
    splits: Annotated[int, typer.Option(help="bisection steps once the capacity is bracketed")] = 4,
    jobs: Jobs = 2,
    profile: Profile_ = A100,
    plot: Annotated[Path | None, typer.Option(help="PNG of SLO attainment against rate")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="every capacity, seed by seed")] = None,
) -> None:
    """Capacity per GPU (req/s at 90 % SLO attainment) of each policy on each scenario, in the
    simulator: mean and 95 % interval over the seeds, against the upper bound."""
    prof = load_profile(profile)
    wanted = policies.split(",")
    knobs_by_scenario = _load_tuned(tuned)
    given = Knobs(budget, max_seqs, prefill_gpus, spec_len)
    window = Window(duration, min_arrivals)
    seed_list = _seeds(seeds)
    logging.disable(logging.WARNING)
    print(f"{prof.model.name} on {prof.hardware}, {gpus} GPU(s) a policy (DistServe: {max(2, gpus)}), windows of "
          f"{duration:.0f} s and {min_arrivals} arrivals at least{', bursty' if bursty else ''}"
          f"{f', acceptance {acceptance}' if acceptance is not None else ''}, {objectives} objectives, seeds "
          f"{seeds}; baselines' knobs {'tuned (' + str(tuned) + ')' if tuned else given.label()}; capacity in "
          "requests per second per GPU (tool calling: tasks), mean [95 % interval]")
    print(f"| scenario | {' | '.join(wanted)} | best baseline | slos ÷ best | bound | slos ÷ bound |")
    print("|---" * (len(wanted) + 5) + "|")
    rows: list[CapacityRow] = []
    with _progress() as bar:
        task = bar.add_task("searches", total=len(_scenarios(scenarios)) * len(wanted) * len(seed_list))
        for name in _scenarios(scenarios):
            knobs = {p: knobs_by_scenario.get(name, {}).get(p, given) for p in wanted if p != "slos"}
            row = capacity_row(name, wanted, prof, gpus, window, Variant(bursty, acceptance, objectives), start,
                               splits, seed_list, knobs, jobs, lambda: bar.advance(task))
            rows.append(row)
            best = row.best_baseline
            slos = row.capacity.get("slos", [math.nan])
            over = [p for p in wanted if row.mean(p) > row.bound]
            print(
                f"| {name} | " + " | ".join(_cell(row.capacity[p]) for p in wanted)
                + f" | {best or 'n/a'} | {_cell(row.ratios()) if best and 'slos' in wanted else 'n/a'} | "
                f"{row.bound:.2f} | {np.mean(slos) / row.bound:.0%} |"
                + (f" above the bound: {', '.join(over)}" if over else ""), flush=True)
    if "slos" in wanted and any(r.best_baseline for r in rows):
        per_seed = [geomean([r.ratios()[i] for r in rows]) for i in range(len(seed_list))]
        print(f"| geometric mean of slos ÷ best baseline | {_cell(per_seed)} |")
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    if plot is not None:
        from bench.plots import attainment_curves

        attainment_curves(plot, {r.scenario: r.probes for r in rows}, f"{prof.model.name}, {gpus} x {prof.hardware}")


def bench_paper(
    out: Annotated[Path, typer.Option(help="folder for the tables' JSON, the tuned knobs and the plots")] = Path(
        "paper"),
    scenarios: Annotated[str, typer.Option(help="comma-separated, or all")] = "all",
    quick: Annotated[bool, typer.Option(help="a smoke run: 30 s windows, a small grid, one held-out seed")] = False,
    profile: Profile_ = A100,
) -> None:
    """The whole evaluation in the simulator: tune the baselines on seed 0, then every policy's
    capacity on held-out seeds, steady and bursty, against the upper bound, with plots."""
    out.mkdir(parents=True, exist_ok=True)
    size = dict(duration=30.0, min_arrivals=150, splits=2) if quick else {}
    seeds = "1" if quick else "1,2,3,4,5"
    knobs = out / "tuned-knobs.json"
    console.rule("tuning the baselines on seed 0")
    bench_tune(scenarios=scenarios, quick=quick, out=knobs, profile=profile, **size)
    for bursty in (False, True):
        label = "bursty" if bursty else "steady"
        console.rule(f"capacity, {label}, seeds {seeds}")
        bench_capacity(scenarios=scenarios, seeds=seeds, tuned=knobs, bursty=bursty, profile=profile,
                       plot=out / f"capacity-{label}.png", json_out=out / f"capacity-{label}.json", **size)
    from bench.plots import arrival_histograms
    from bench.workloads import scenario

    prof = load_profile(profile)
    seconds = size.get("duration", STEADY_S)
    arrivals = {n: [a.at for a in scenario(n, prof, 4.0, seconds, 1, True)] for n in _scenarios(scenarios)}
    arrival_histograms(out / "arrivals-bursty.png", arrivals, f"bursty arrivals at 4 req/s, seed 1, {seconds:.0f} s")
    console.print(f"tables above; JSON and plots in {out}")


def bench_replicas(
    scenario_name: Annotated[str, typer.Option("--scenario", help="a scenario")] = "tool_calling",
    replicas: Annotated[str, typer.Option(help="comma-separated")] = "1,2,4,8",
    duration: Duration = STEADY_S,
    min_arrivals: MinArrivals = STEADY_ARRIVALS,
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "1,2,3",
    bursty: Annotated[bool, typer.Option(help="the bursty variant")] = True,
    policies: Annotated[str, typer.Option(help="comma-separated")] = "slos,sarathi",
    profile: Profile_ = A100,
    plot: Annotated[Path | None, typer.Option(help="PNG of capacity against replicas")] = None,
) -> None:
    """Capacity as replicas are added (mean over seeds): superlinear when routing and admission
    pool the slack."""
    prof = load_profile(profile)
    wanted = policies.split(",")
    counts = [int(r) for r in replicas.split(",")]
    window = Window(duration, min_arrivals)
    logging.disable(logging.WARNING)
    print(f"{scenario_name}{' (bursty)' if bursty else ''}, {prof.model.name} on {prof.hardware}, seeds {seeds}; "
          "capacity in req/s, mean [95 % interval], and as a multiple of one replica's mean")
    print("| replicas | " + " | ".join(wanted) + " |")
    print("|---" * (len(wanted) + 1) + "|")
    series: dict[str, list[tuple[int, float]]] = {p: [] for p in wanted}
    for n in counts:
        cells = []
        for policy in wanted:
            s = setup(policy, prof, n)
            caps = [search(s, scenario_name, prof, window, Variant(bursty), start=2.0 * n, seed=seed).capacity
                    for seed in _seeds(seeds)]
            series[policy].append((n, float(np.mean(caps))))
            single = series[policy][0][1]
            cells.append(_cell(caps) + (f" ({np.mean(caps) / single:.1f}x)" if single else ""))
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
    if plot is not None:
        from bench.plots import scaling

        scaling(plot, series, f"{scenario_name}{' (bursty)' if bursty else ''}, {prof.model.name} on {prof.hardware}")


"""`slos-serve bench live`, `bench compare` and `bench aiperf`: load tests against live
servers, printed as the Markdown tables `docs/benchmarks.md` quotes, with JSON results and
plots."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.load_test import Endpoint, Report, Run, discover, idle_cost, run_at, save, search, workload
from bench.workloads import Outcome, every_request
from shared.model_info import vocab_size
from shared.roofline import SHIPPED_PROFILES, load_profile

console = Console(stderr=True)
DEFAULT_OBJECTIVES = SHIPPED_PROFILES / "cpu-1_smollm2-135m-instruct.json"
Objectives = Annotated[Path, typer.Option(help="profile whose idle latencies the objectives scale with")]
ApiKey = Annotated[str, typer.Option(envvar="SLOS_API_KEY", help="the server's API key")]


def _ms(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.0f}"


def print_runs(runs: list[Run]) -> None:
    print("| req/s | class | requests | refused | attainment | goodput req/s | TTFT p50 / p90 / p99 ms | "
          "TPOT p50 / p90 / p99 ms | workers waited |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        idle = f"{run.workers.idle_share:.2%} of step time" if run.workers else "–"
        for name, lat in [("all", run.overall), *run.by_class.items()]:
            print(f"| {run.rate:.3g} | {name} | {lat.requests} | {lat.refused} | {lat.attainment:.1%} | "
                  f"{lat.met / run.duration_s:.3g} | {' / '.join(_ms(v) for v in lat.ttft_ms.values())} | "
                  f"{' / '.join(_ms(v) for v in lat.tpot_ms.values())} | {idle if name == 'all' else ''} |")


def plot(report: Report, out: Path, label: str) -> None:
    from bench.plots import attainment_curves, latency_cdfs

    shown = max((r for r in report.runs if r.overall.attainment >= 0.9), key=lambda r: r.rate, default=report.runs[-1])

    def samples(outcomes: list[Outcome]) -> tuple[list[float], list[float]]:
        done = [o for o in outcomes if o.finished]
        return ([o.ttft_s * 1e3 for o in done if o.ttft_s is not None],
                [max(t for t in o.tpots_s if t is not None) * 1e3 for o in done if any(t is not None for t in o.tpots_s)])

    by_class = {c: samples([o for o in shown.outcomes if o.slo_class == c]) for c in shown.by_class}
    latency_cdfs(out / f"{label}-latency.png", by_class, f"{report.scenario} at {shown.rate:.3g} req/s, {report.model}")
    if len(report.runs) > 1:
        attainment_curves(out / f"{label}-attainment.png",
                          {report.scenario: {label: [(r.rate, r.overall.attainment) for r in report.runs]}},
                          report.model, xlabel="requests per second")


def load_test(endpoint: Endpoint, scenario_name: str, rate: float, find_capacity: bool, duration: float,
              objectives: Path, seed: int, bursty: bool, max_requests: int | None, vocab: int, splits: int,
              probe_idle: bool) -> Report:
    """One rate, or the capacity search, against `endpoint`, with a progress bar per run."""
    profile = load_profile(objectives)
    idle = idle_cost(endpoint, vocab) if probe_idle else None

    def at(r: float) -> Run:
        arrivals = workload(scenario_name, profile, r, duration, seed, bursty, endpoint.max_model_len, max_requests)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"{scenario_name} at {r:.3g} req/s", total=len(every_request(arrivals)))
            met = 0

            def seen(o: Outcome) -> None:
                nonlocal met
                met += o.met
                progress.update(task, advance=1, description=f"{scenario_name} at {r:.3g} req/s, {met} met")

            run = run_at(endpoint, arrivals, r, duration, vocab, seen)
        console.print(f"{r:.3g} req/s: attainment {run.overall.attainment:.1%}, {run.overall.refused} refused")
        return run

    machine = {"node": platform.node(), "processor": platform.processor() or platform.machine()}
    report = Report(endpoint.url, endpoint.model, scenario_name, str(objectives), seed, [], None, idle, machine)
    if find_capacity:
        found, report.runs = search(at, rate, splits)
        report.capacity = found.capacity
    else:
        report.runs = [at(rate)]
    return report


def bench_live(
    endpoint: Annotated[str, typer.Option(help="the server's base URL, e.g. http://127.0.0.1:8000")],
    api_key: ApiKey = "none",
    model: Annotated[str | None, typer.Option(help="the model to ask for (default: the first it lists)")] = None,
    scenario_name: Annotated[str, typer.Option("--scenario", help="chatbot, coding, summarization, mixed, "
                                               "tool_calling or reasoning")] = "chatbot",
    rate: Annotated[float, typer.Option(help="requests per second (with --capacity: where the search starts)")] = 1.0,
    find_capacity: Annotated[bool, typer.Option("--capacity", help="search the rate at 90 % attainment")] = False,
    duration: Annotated[float, typer.Option(help="seconds of arrivals per run")] = 60.0,
    max_requests: Annotated[int | None, typer.Option(help="send at most this many first arrivals per run")] = None,
    bursty: Annotated[bool, typer.Option(help="the bursty variant (3x the rate 10 s in every 40 s)")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    objectives: Objectives = DEFAULT_OBJECTIVES,
    vocab: Annotated[int, typer.Option(help="prompt token ids are drawn below this")] = 32000,
    splits: Annotated[int, typer.Option(help="bisection steps of the capacity search")] = 4,
    admin_url: Annotated[str | None, typer.Option(help="our planner's admin API, for the workers' waits")] = None,
    admin_token: Annotated[str | None, typer.Option(envvar="SLOS_ADMIN_TOKEN", help="its token")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for results.json and the PNGs")] = None,
) -> None:
    """Replay a scenario against any OpenAI-compatible server and judge it from the client's side."""
    target = discover(endpoint, api_key, model, admin_url, admin_token)
    report = load_test(target, scenario_name, rate, find_capacity, duration, objectives, seed, bursty, max_requests,
                       vocab, splits, probe_idle=admin_url is not None)
    print(f"{scenario_name} against {target.url} ({target.model}), {duration:g} s of arrivals per run, "
          f"objectives scaled to {objectives.name}")
    if report.idle is not None:
        beyond = f", {report.idle.beyond_step_ms:.1f} ms of it beyond the step" if report.idle.beyond_step_ms else ""
        print(f"idle one-token request: time to first token {report.idle.ttft_ms:.1f} ms{beyond}")
    print_runs(report.runs)
    if report.capacity is not None:
        print(f"capacity at 90 % attainment: {report.capacity:.3g} req/s")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save(report, out / "results.json")
        plot(report, out, scenario_name)


def bench_compare(
    model: Annotated[Path | None, typer.Option(help="safetensors directory (default: SmolLM2)")] = None,
    scenarios: Annotated[str, typer.Option(help="comma-separated")] = "chatbot,coding,mixed",
    configs: Annotated[str, typer.Option(help="comma-separated, of: slos, fcfs, sarathi, slos-disaggregated, "
                                         "distserve, slos-vllm (ours on vLLM's engine core), vllm, "
                                         "vllm-bfloat16")] = "slos,fcfs,sarathi,slos-disaggregated,"
                                                                           "distserve,vllm",
    rate: Annotated[float, typer.Option(help="where each capacity search starts, req/s")] = 0.5,
    duration: Annotated[float, typer.Option(help="seconds of arrivals per probe")] = 30.0,
    splits: Annotated[int, typer.Option(help="bisection steps of each capacity search")] = 3,
    seed: Annotated[int, typer.Option()] = 0,
    objectives: Objectives = DEFAULT_OBJECTIVES,
    vllm_python: Annotated[Path | None, typer.Option(help="the vLLM virtualenv's python "
                                                     "(default: `bench setup-vllm`'s)")] = None,
    out: Annotated[Path, typer.Option(help="folder for the logs, the JSON results and the plot")] = Path("compare"),
) -> None:
    """Start each configuration in turn on the same core and trace, find its live capacity, stop it."""
    from bench.compare import CONFIGS, serving
    from bench.engine_bench import default_vllm_python
    from bench.plots import attainment_curves
    from models.resolve import resolve_model

    directory, _ = resolve_model(model, console)
    vocab = vocab_size(directory)
    python = vllm_python or default_vllm_python()
    out.mkdir(parents=True, exist_ok=True)
    names, chosen = scenarios.split(","), [CONFIGS[c] for c in configs.split(",")]
    found: dict[str, dict[str, Report]] = {c.name: {} for c in chosen}
    for config in chosen:
        with serving(config, directory, out, python) as endpoint:
            for name in names:
                console.print(f"[bold]{config.name}[/bold], {name}")
                report = load_test(endpoint, name, rate, True, duration, objectives, seed, False, None, vocab, splits,
                                   probe_idle=True)
                save(report, out / f"{config.name}-{name}.json")
                found[config.name][name] = report
    print(f"Capacity at 90 % attainment, req/s ({duration:g} s of arrivals per probe, objectives scaled to "
          f"{objectives.name}); in brackets, against vLLM where it ran; then the idle one-token TTFT:")
    print("| configuration | " + " | ".join(names) + " | idle TTFT ms |")
    print("|---|" + "---|" * (len(names) + 1))
    for config in chosen:
        cells = []
        for name in names:
            cap, peer = found[config.name][name].capacity or 0.0, found.get("vllm", {}).get(name)
            ratio = f" ({cap / peer.capacity:.2f}x)" if peer is not None and peer.capacity else ""
            cells.append(f"{cap:.3g}{ratio}")
        idle = found[config.name][names[0]].idle
        print(f"| {config.name} | " + " | ".join(cells) + (f" | {idle.ttft_ms:.0f} |" if idle else " | – |"))
    attainment_curves(out / "compare-attainment.png",
                      {name: {c: [(r.rate, r.overall.attainment) for r in found[c][name].runs] for c in found}
                       for name in names}, f"{directory.name}, live, one engine core", xlabel="requests per second")


def bench_aiperf(
    endpoint: Annotated[str, typer.Option(help="the server's base URL")],
    api_key: ApiKey = "none",
    scenario_name: Annotated[str, typer.Option("--scenario", help="a scenario without tool loops")] = "chatbot",
    rate: Annotated[float, typer.Option(help="requests per second")] = 0.5,
    duration: Annotated[float, typer.Option(help="seconds of arrivals")] = 60.0,
    seed: Annotated[int, typer.Option()] = 0,
    objectives: Objectives = DEFAULT_OBJECTIVES,
    tokenizer: Annotated[Path | None, typer.Option(help="the model's directory, for aiperf's tokenizer "
                                                   "(default: SmolLM2's)")] = None,
    aiperf: Annotated[Path, typer.Option(help="the aiperf command")] = Path("aiperf"),
    out: Annotated[Path, typer.Option(help="folder for the trace, aiperf's artifacts and log")] = Path("aiperf-check"),
) -> None:
    """The same requests at the same times from `bench live` and from aiperf, against one server."""
    from bench.aiperf_check import ours, run_aiperf, single_calls
    from models.resolve import resolve_model

    directory, _ = resolve_model(tokenizer, console)
    vocab = vocab_size(directory)
    target = discover(endpoint, api_key)
    arrivals = single_calls(workload(scenario_name, load_profile(objectives), rate, duration, seed, False,
                                     target.max_model_len))
    out.mkdir(parents=True, exist_ok=True)
    mine = ours(run_at(target, arrivals, rate, duration, vocab))
    theirs = run_aiperf(aiperf, target, arrivals, vocab, directory, out)
    print(f"{scenario_name} at {rate:g} req/s, {len(arrivals)} requests, against {target.url} ({target.model})")
    print("| measure | bench live | aiperf | difference |")
    print("|---|---|---|---|")
    rows = [(f"TTFT {k} ms", mine.ttft_ms[k], theirs.ttft_ms[k]) for k in ("avg", "p50", "p90")]
    rows += [("output tokens/s", mine.output_tok_s, theirs.output_tok_s), ("requests", mine.requests, theirs.requests)]
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {(b - a) / a:+.1%} |")

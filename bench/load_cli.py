"""`slos-serve bench live`, `compare`, `aiperf`, `validate`, `promises` and `dashboard`: load
tests against live servers, printed as the Markdown tables `docs/benchmarks.md` quotes, with
JSON results and plots."""

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
from models.resolve import BUILTIN, resolve_model
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


def bench_validate(
    scenario_name: Annotated[str, typer.Option("--scenario", help="a scenario")] = "chatbot",
    duration: Annotated[float, typer.Option(help="seconds of arrivals per run")] = 30.0,
    splits: Annotated[int, typer.Option(help="bisection steps once the capacity is bracketed")] = 4,
    model: Annotated[Path | None, typer.Option(help="safetensors directory or GGUF (default: built-in)")] = None,
) -> None:
    """Capacity of one scenario live (`slos-serve up`, one worker) and in the simulator, on this machine."""
    import tempfile

    from bench.validate import validate

    directory, _ = resolve_model(model or BUILTIN, console)
    with tempfile.TemporaryDirectory() as tmp:
        v = validate(directory, scenario_name, duration, Path(tmp), splits)
    steps = v.loaded
    print(f"{scenario_name}, {duration:.0f} s of arrivals per run, loop overhead {v.loop_overhead_s * 1e3:.1f} ms a step, "
          f"front end {v.front_s * 1e3:.1f} ms a request; "
          f"under load steps ran {steps} (spread {steps.spread:.3f})")
    print("| run | capacity req/s | ÷ live | probes (rate: attainment) |")
    print("|---|---|---|---|")
    runs = (("simulated, idle profile", v.simulated), ("simulated, profile as loaded", v.simulated_loaded),
            ("simulated, profile and scatter as loaded", v.simulated_scattered), ("live", v.live))
    for name, found in runs:
        probes = ", ".join(f"{r:.2f}: {a:.0%}" for r, a in found.probes)
        ratio = f"{found.capacity / v.live.capacity:.2f}" if v.live.capacity else "n/a"
        print(f"| {name} | {found.capacity:.3f} | {ratio} | {probes} |")
    print("live calibration per rate: " + "; ".join(f"{r:.2f}: {s}" for r, s in sorted(v.seen.items())))


def bench_promises(
    rates: Annotated[str, typer.Option(help="requests per second, comma-separated")] = "0.6",
    policies: Annotated[str, typer.Option(help="comma-separated")] = "slos,sarathi,fcfs",
    model: Annotated[Path | None, typer.Option(help="safetensors directory or GGUF (default: SmolLM2)")] = None,
    count: Annotated[int, typer.Option(help="requests per run")] = 40,
    tight_tpot_ms: Annotated[float, typer.Option()] = 110.0,
    loose_tpot_ms: Annotated[float, typer.Option()] = 400.0,
    ttft_ms: Annotated[float, typer.Option()] = 3000.0,
    worker_cpus: Annotated[str | None, typer.Option(help="pin the worker to these cores (default: share all)")] = None,
    front_cpus: Annotated[str | None, typer.Option(help="pin the gateway, planner and client to these cores "
                                                        "(default: share all)")] = None,
    profile: Annotated[Path | None, typer.Option(help="the profile to plan with (default: what `up` picks)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Tight and loose TPOTs open loop against `slos-serve up` (issue 28): what each policy
    promised, refused and kept, by the clients' own token times. A burst is a high rate:
    `--rates 300 --count 600`."""
    import tempfile

    from bench.promises import Load, run

    directory, _ = resolve_model(model, console)
    vocab = vocab_size(directory)
    cpus = {int(c) for c in worker_cpus.split(",")} if worker_cpus else None
    front = {int(c) for c in front_cpus.split(",")} if front_cpus else None
    print("| policy | req/s | promised | promised met (by the planner's clock) | refused | 429 p50 / p99 ms | "
          "best effort | attainment | tight met | tight TPOT p50 / p90 ms | loose met | loose TPOT p50 / p90 ms | "
          "calibration at the end | "
          "the planner's verdict at the gateway, p50 / p99 ms (bucket bounds) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for rate in (float(r) for r in rates.split(",")):
            for policy in policies.split(","):
                load = Load(rate, count, tight_tpot_ms, loose_tpot_ms, ttft_ms, seed=seed)
                r = run(directory, policy, load, Path(tmp), vocab, cpus, profile, front)
                row, fit = r.row(), r.step_fit

                def ms(x: object) -> str:
                    return "–" if x is None else f"{x:.0f}"

                counted = r.planner_promises.get("promised", {"met": 0, "total": 0})
                print(f"| {policy} | {rate:g} | {row['promised']} | {row['promised_met']} "
                      f"({counted['met']} of {counted['total']}) | {row['refused']} | "
                      f"{ms(row['refusal_p50_ms'])} / {ms(row['refusal_p99_ms'])} | {row['best_effort']} | "
                      f"{row['attainment']:.0%} | {row['tight_met']} | "
                      f"{ms(row['tight_tpot_p50_ms'])} / {ms(row['tight_tpot_p90_ms'])} | {row['loose_met']} | "
                      f"{ms(row['loose_tpot_p50_ms'])} / {ms(row['loose_tpot_p90_ms'])} | "
                      f"+{fit['turnaround_s'] * 1e3:.0f} ms, x{fit['fixed']:.2f} / {fit['compute']:.2f} / "
                      f"{fit['memory']:.2f}, {fit['error']:.0%} off, margin {fit['margin']:.2f} | "
                      + ", ".join(f"{v} ≤ {a * 1e3:g} / ≤ {b * 1e3:g}" for v, (a, b) in sorted(r.verdicts.items()))
                      + " |", flush=True)


def bench_dashboard(
    out: Annotated[Path, typer.Option(help="PNG to write")],
    prometheus: Annotated[str, typer.Option(help="Prometheus server scraping the gateway")] = "http://127.0.0.1:9090",
    minutes: Annotated[float, typer.Option(help="time range, ending now")] = 10.0,
) -> None:
    """Render deploy/grafana's dashboard from Prometheus into one PNG (each panel's own queries)."""
    from bench.dashboard import render

    console.print(f"{out}: {render(prometheus, out, minutes)} series")

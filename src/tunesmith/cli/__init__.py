"""Command line: one thin command per stage; all logic lives in the stage functions."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli import data as cli_data
from tunesmith.cli import loop as cli_loop
from tunesmith.cli import ui as cli_ui
from tunesmith.cli.common import DEBUG, OUT, OVERWRITE, QUIET, name_list, run_app
from tunesmith.cli.common import guarded as _guarded
from tunesmith.registry import DISPARITY_FIGURES, METRIC_SPECS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tunesmith: fine-tune a language model against a declared, measured objective.")
runs_app = typer.Typer(no_args_is_help=True, help="The run registry: list, show and compare runs.")
app.add_typer(runs_app, name="runs")


def _print_summary(summary: dict) -> None:
    failed = summary.get("failed")
    if failed:
        print(f"the {failed['stage']} stage failed: {failed['error']}")
        print("  rerun: " + " then ".join(failed["rerun"]))
    if "objective" not in summary:  # eval never finished: no verdict to show
        print(f"run directory: {summary['run_dir']}")
        return
    objective = summary["objective"]
    vacuous = " (no criteria set: objective.target, min_gain and constraints are all unset)"
    print(f"objective {'MET' if objective['met'] else 'NOT MET'}{'' if objective['criteria'] else vacuous}")
    for c in objective["criteria"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.4g}"
        print(f"  {'ok  ' if c['met'] else 'FAIL'} {c['name']}: {value} (target {c['op']} {c['target']:g})")
    base, tuned = summary["metrics"]["baseline"], summary["metrics"]["finetuned"]
    metric = summary["objective_metric"]
    print(f"  {metric}: baseline {_figure(base.get(metric))} -> fine-tuned {_figure(tuned.get(metric))}")
    gain = summary.get("comparison", {}).get(metric)
    if gain:
        spec = METRIC_SPECS.get(metric)  # for perplexity a fall is the improvement: say so, not "gain"
        word = "gain" if spec is None or spec.higher_is_better else "change (lower is better)"
        print(f"  {word} {gain['diff']:+.4f}, 95% CI [{gain['ci_low']:+.4f}, {gain['ci_high']:+.4f}], "
              f"{gain['test']} p = {gain['p_value']:.3g}")
    data = summary.get("data", {})
    if data.get("test_rows_not_scored"):  # said as loudly as test rows the data stage removed
        print(f"  test rows not scored: {data['test_rows_not_scored']} (" + ", ".join(
            f"{k} {v}" for k, v in data["test_rows_not_scored_by_reason"].items()) + ")")
    print(f"run directory: {summary['run_dir']}")
    print(f"report: {summary['report']}")


def _number(value, signed: bool = False) -> str:
    """A figure in full when it is a whole number (trainable_params 16384, not 1.638e+04), else 4 digits."""
    sign = "+" if signed else ""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value):{sign},}"
    return f"{value:{sign}.4g}"


def _figure(value) -> str:
    """A metric as the summary prints it; "n/a" for one the run could not measure (null in metrics.json)."""
    return "n/a" if value is None else f"{value:.4f}"


@app.command()
def run(config: Path = typer.Argument(..., help="project.yaml"), out: Optional[Path] = OUT,
        overwrite: bool = OVERWRITE, quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Run every stage: data, train, eval, verdict, report. Exit 0 objective met, 3 not met."""
    def go() -> int:
        from tunesmith import pipeline
        from tunesmith.config import load_config

        summary = pipeline.run(load_config(config), out, progress=not quiet, keep_failed=debug, overwrite=overwrite)
        _print_summary(summary)
        return pipeline.exit_code(summary)
    _guarded(debug, go, resumable=True)


@app.command()
def train(config: Optional[Path] = typer.Argument(None, help="project.yaml"), out: Optional[Path] = OUT,
          resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run's training."),
          overwrite: bool = OVERWRITE, quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Curate the data and fine-tune; evaluate later with `tunesmith eval RUN_DIR`."""
    def go() -> int:
        from tunesmith import pipeline
        from tunesmith.config import load_config
        from tunesmith.errors import InputError

        if (config is None) == (resume is None):
            raise InputError("give either a project.yaml or --resume RUN_DIR", "command line",
                             "tunesmith train project.yaml, or tunesmith train --resume RUN_DIR")
        if resume is not None and out is not None:  # resumed where it was staged: --out was ignored, unsaid
            raise InputError("--out cannot be given with --resume (the run goes on in the folder it was started "
                             "for)", "--out", "leave --out out")
        if resume is not None:
            run_dir = pipeline.resume_training(resume, progress=not quiet, keep_failed=debug, overwrite=overwrite)
        else:
            run_dir = pipeline.train_only(load_config(config), out, progress=not quiet, keep_failed=debug,
                                          overwrite=overwrite)
        print(f"run directory: {run_dir}")
        return 0
    _guarded(debug, go, resumable=True)


@app.command("eval")
def eval_(run_dir: Path = typer.Argument(..., help="a run directory with a trained model"),
          quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Evaluate baseline and fine-tuned model on the test split; write metrics, verdict, report."""
    def go() -> int:
        from tunesmith import pipeline

        summary = pipeline.evaluate_run(run_dir, progress=not quiet)
        _print_summary(summary)
        return pipeline.exit_code(summary)
    _guarded(debug, go)


@app.command()
def report(run_dir: Optional[Path] = typer.Argument(None, help="an evaluated run directory"),
           compare: Optional[tuple[str, str]] = typer.Option(None, "--compare", metavar="A B",
                                                             help="Two runs (ids or folders) on one page instead."),
           out: Optional[Path] = typer.Option(None, "--out", help="With --compare: the page to write "
                                                                  "(default B/compare_<A>.html)."),
           debug: bool = DEBUG) -> None:
    """Rebuild report.html and model_card.md of a run directory, or compare two runs (--compare A B)."""
    def go() -> int:
        from tunesmith.errors import InputError, RunDirError

        if compare is not None:
            from tunesmith.report.compare_page import compare_report, default_page
            from tunesmith.run_registry import find_run

            if run_dir is not None:
                raise InputError("give either RUN_DIR or --compare A B", "--compare")
            a, b = find_run(compare[0]).resolve(), find_run(compare[1]).resolve()
            if a == b:
                print(f"report: A and B are the same run ({a}): every difference on the page is 0", file=sys.stderr)
            print(f"report: {compare_report(a, b, out or default_page(a, b))}")
            return 0
        from tunesmith.pipeline import report_run
        from tunesmith.runs import is_run_dir

        if run_dir is None:
            raise InputError("give a run directory, or --compare A B", "RUN_DIR")
        if out is not None:  # the run's report is always RUN_DIR/report.html; say so rather than ignore --out
            raise InputError("goes with --compare only; a run's report is written to RUN_DIR/report.html", "--out")
        # A typo or another folder: "run eval first" would send the user astray. (A run whose weights were
        # deleted to save space still has its config.yaml: its report needs no model.)
        if not is_run_dir(run_dir) and not (run_dir / "config.yaml").is_file():
            raise RunDirError("not found" if not run_dir.exists() else "not a tunesmith run directory "
                              "(no model/tunesmith.json or config.yaml)", str(run_dir),
                              "give a folder made by `tunesmith run`")
        if not (run_dir / "summary.json").is_file():
            raise RunDirError("no summary.json: the run has not been evaluated", str(run_dir),
                              "run `tunesmith eval` first")
        print(f"report: {report_run(run_dir)}")
        return 0
    _guarded(debug, go)


@app.command()
def optimize(run_dir: Path = typer.Argument(..., help="an evaluated run directory"),
             variants: Optional[str] = typer.Option(None, "--variants",
                                                    help="Comma-separated variants (default: optimize.variants)."),
             quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Build inference variants (merged, int8, ...), measure each against the fp32 model, select one.
    Exit 0 when one (fp32 included) meets the objective, 3 when none does."""
    def go() -> int:
        from tunesmith import pipeline

        names = name_list(variants, "--variants") if variants is not None else None
        if names == []:  # an empty list would measure the fp32 model alone and report success
            from tunesmith.errors import InputError

            raise InputError("names no variant", "--variants",
                             "give e.g. --variants merged,int8, or leave it out for optimize.variants")
        result = pipeline.optimize_run(run_dir, names, progress=not quiet)
        _print_variants(result)
        return 0 if result.selected else 3  # as `run`: completed, but nothing meets the objective
    _guarded(debug, go)


@app.command("export")
def export_command(run_dir: Path = typer.Argument(..., help="an evaluated run directory"),
                   fmt: str = typer.Option("hf", "--format", help="hf, gguf or ollama (GGUF + Modelfile)."),
                   out: Path = typer.Option(..., "--out", help="Folder to create (new or empty)."),
                   quant: Optional[str] = typer.Option(None, "--quant", help="GGUF type: f16, q8_0 (default), "
                                                       "q4_K_M (needs llama-cpp-python)."),
                   min_agreement: Optional[float] = typer.Option(
                       None, "--min-agreement", help="Least share of test predictions the read-back export must "
                       "share with the run (default: the run's export.min_agreement, else 0.98; q4_K_M 0.90)."),
                   debug: bool = DEBUG) -> None:
    """Export the run's model (hf folder, gguf file, ollama GGUF + Modelfile), verified by reading it back."""
    def go() -> int:
        from tunesmith.optimize.export import export

        r = export(run_dir, out, fmt, quant, min_agreement)
        kind = r.format if r.quant is None else f"{r.format} {r.quant}"
        tokens = "" if r.token_mismatches is None else f", {r.token_mismatches} prompts tokenized differently"
        print(f"{kind}: agreement {r.agreement:.4f} on {r.n} test rows (minimum {r.min_agreement}), {r.metric} "
              f"{r.metric_export} (run {r.metric_run}, delta {r.delta}), {r.size_mb} MB, loaded in "
              f"{r.load_seconds:.2f} s, read back by {r.reader}{tokens}")
        if r.modelfile:
            m = r.modelfile
            print(f"Modelfile: TEMPLATE gives the run's prompt on {m['rows'] - m['mismatches'] - m['skipped']} of "
                  f"{m['rows']} test rows ({m['skipped']} chat rows not compared)")
        print(f"export: {r.path}")
        return 0
    _guarded(debug, go)


def _print_variants(result) -> None:
    """The optimize stage's table (an optimize.result.OptimizeResult)."""
    metric = result.objective_metric
    ref = result.variants[0]
    print(f"{'variant':<18}{metric:>10}{'delta':>9}{'p50 ms':>9}{'p95 ms':>9}{'speedup':>9}{'/s @16':>8}"
          f"{'MB':>8}  offered")
    for v in result.variants:
        speedup = ref.latency_p50_ms / v.latency_p50_ms if v.latency_p50_ms else float("nan")
        print(f"{v.name:<18}{v.metrics[metric]:>10.4f}{v.quality_delta:>+9.4f}{v.latency_p50_ms:>9.1f}"
              f"{v.latency_p95_ms:>9.1f}{speedup:>8.2f}x{v.throughput_per_s:>8.1f}{v.size_mb:>8.1f}  "
              f"{'yes' if v.parity_ok else 'no'}")
    for s in result.skipped:
        print(f"{s.name:<18}skipped: {s.reason}")
    print(f"selected: {result.selected or 'none'} ({result.reason})")


@app.command()
def audit(run_dir: Path = typer.Argument(..., help="an evaluated run directory"), quiet: bool = QUIET,
          debug: bool = DEBUG) -> None:
    """Audit the data and the model for bias: per-group figures, disparities with CIs, probes."""
    def go() -> int:
        from tunesmith import pipeline

        result = pipeline.audit_run(run_dir, progress=not quiet)
        _print_audit(result["audit"])
        _print_summary(result["summary"])
        return pipeline.exit_code(result["summary"])
    _guarded(debug, go)


def _print_audit(audit: dict) -> None:
    for name in DISPARITY_FIGURES:
        f = audit[name]
        if f["value"] is None:
            print(f"{name}: n/a (fewer than two comparable groups)")
            continue
        print(f"{name}: {f['value']:.4f}, 95% CI [{f['ci_low']:.4f}, {f['ci_high']:.4f}] "
              f"({f['attribute']}, label {f['label']})")
    cf = audit["counterfactual"]
    if cf["flip_rate"] is not None:
        print(f"counterfactual flip rate: {cf['flip_rate']:.4f} over {cf['swaps']} identity-term swaps")
    t = audit.get("threshold_optimizer")
    if t and "skipped" in t:
        print(f"threshold optimizer not run: {t['skipped']}")
    elif t:
        print(f"threshold optimizer ({t['constraint']}, {t['attribute']}): demographic parity difference "
              f"{t['before']['demographic_parity_difference']:.4f} -> "
              f"{t['after']['demographic_parity_difference']:.4f}, "
              f"accuracy {t['before']['accuracy']:.4f} -> {t['after']['accuracy']:.4f}")


@runs_app.command("list")
def runs_list(name: Optional[str] = typer.Option(None, "--name", help="Only runs of this project name."),
              debug: bool = DEBUG) -> None:
    """Registered runs, newest first."""
    def go() -> int:
        from tunesmith.run_registry import list_runs, registry_path

        rows = list_runs(name)
        print(f"{'id':>4}  {'created':<26}{'name':<24}{'method':<20}{'metric':<12}{'value':>8}{'gain':>8}  met  run")
        for r in rows:
            value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
            gain = "n/a" if r["value"] is None or r["baseline"] is None else f"{r['value'] - r['baseline']:+.4f}"
            print(f"{r['id']:>4}  {r['created']:<26}{r['name'][:23]:<24}{r['method']:<20}{r['metric']:<12}{value:>8}"
                  f"{gain:>8}  {'yes' if r['met'] else 'no ':<4} {r['run_dir']}{'' if r['exists'] else ' (gone)'}")
        print(f"{len(rows)} run(s) in {registry_path()}")
        return 0
    _guarded(debug, go)


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., help="run id or run directory"), debug: bool = DEBUG) -> None:
    """A run's verdict and metrics."""
    def go() -> int:
        from tunesmith.run_registry import find_run
        from tunesmith.runs import read_summary, reading_run_files

        path = find_run(run, evaluated=False)
        text = io.StringIO()
        with reading_run_files(path), contextlib.redirect_stdout(text):  # all of it, or only the error line
            summary = read_summary(path)
            # where the run is now: summary.json names the folder eval wrote it in (copied or moved since?)
            summary.update(run_dir=str(path.resolve()), report=str(path.resolve() / "report.html"))
            _print_summary(summary)
        print(text.getvalue(), end="")
        return 0
    _guarded(debug, go)


@runs_app.command("diff")
def runs_diff(a: str = typer.Argument(..., help="run id or directory"),
              b: str = typer.Argument(..., help="run id or directory"),
              debug: bool = DEBUG) -> None:
    """Config differences and metric deltas (B - A), with a paired test on shared test examples."""
    def go() -> int:
        from tunesmith.evaluate.run_diff import config_diff, metric_diff
        from tunesmith.run_registry import find_run
        from tunesmith.runs import reading_run_files

        ra, rb = find_run(a), find_run(b)
        with reading_run_files(ra, rb):  # both read before a line is printed
            changes, m = config_diff(ra, rb), metric_diff(ra, rb)
        print(f"config: {len(changes)} key(s) differ")
        for c in changes:
            print(f"  {c['key']}: {c['a']!r} -> {c['b']!r}")
        print("metrics (fine-tuned, B - A):")
        for k, v in m["metrics"].items():
            print(f"  {k}: {_number(v['a'])} -> {_number(v['b'])} ({_number(v['diff'], signed=True)})")
        p = (m["paired"] or {}).get(m["metric"])
        if p:
            where = "the same test examples" if m["same_test_examples"] else \
                f"the {m['paired_examples']} test examples both runs scored"
            print(f"{m['metric']} on {where}: {p['diff']:+.4f}, 95% CI [{p['ci_low']:+.4f}, "
                  f"{p['ci_high']:+.4f}], p = {p['p_value']:.3g}")
        else:
            print(f"no paired test: {m['unpaired']}")
        return 0
    _guarded(debug, go)


@app.command("compare")
def compare_command(config: Path = typer.Argument(..., help="project.yaml"),
                    methods: str = typer.Option("lora,full,prompt_tuning,prompt_optimization", "--methods",
                                                help="Comma-separated methods to train and compare."),
                    out: Path = typer.Option(..., "--out", help="Folder for one run per method and compare.json."),
                    overwrite: bool = OVERWRITE, quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Bake-off: train each method on the same splits and budget; print and plot a leaderboard.
    Exit 0 when a method meets the objective, 3 when none does."""
    def go() -> int:
        from tunesmith import pipeline
        from tunesmith.config import load_config
        from tunesmith.evaluate.leaderboard import table

        names = name_list(methods, "--methods")
        ranked = pipeline.compare_methods(load_config(config), names, out, progress=not quiet, overwrite=overwrite)
        print(table(ranked))
        print(f"leaderboard: {out / 'compare.json'}, plot: {out / 'compare.png'}")
        return pipeline.EXIT_MET if any(e["objective_met"] for e in ranked) else pipeline.EXIT_NOT_MET
    _guarded(debug, go)


@app.command("tune")
def tune_command(config: Path = typer.Argument(..., help="project.yaml"),
                 trials: int = typer.Option(8, "--trials", min=1, max=1000,
                                            help="Trials in the study (the first is the config as written); "
                                                 "at most 1,000, each one a training."),
                 out: Path = typer.Option(..., "--out", help="Folder for study.sqlite, trial logs and the best run."),
                 overwrite: bool = OVERWRITE, quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Hyperparameter search (Optuna TPE, pruning on the validation metric); the best trial becomes a run."""
    def go() -> int:
        from tunesmith import pipeline
        from tunesmith.config import load_config
        from tunesmith.tune import tune

        result = tune(load_config(config), trials, out, progress=not quiet, overwrite=overwrite)
        for t in result["trials"]:
            # FAIL (Ctrl-C, an error) or RUNNING (a killed process): stopped before a score; a later tune of this
            # --out runs another in its place.
            value = (f"{t['value']:.4f}" if t["value"] is not None
                     else "pruned" if t["state"] == "PRUNED" else "stopped")
            print(f"trial {t['number']:>3} {t['state']:<9} {value:>8}  {t['params']}")
        default = result["default_validation"]
        print(f"default config (trial {result['default_trial']}): {'pruned' if default is None else f'{default:.4f}'}; "
              f"best: trial "
              f"{result['best_trial']} {result['best_validation']:.4f} with {result['best_params']}")
        _print_summary(result["summary"])
        return pipeline.exit_code(result["summary"])
    _guarded(debug, go)


def _candidate_names(given: str | None) -> list[str] | None:
    """--candidates as a list of model names (None: the catalog); an empty list or a name given twice is
    refused (it probed the whole catalog, or one model twice)."""
    from tunesmith.errors import InputError

    if given is None:
        return None
    names = [c.strip() for c in given.split(",") if c.strip()]
    if not names:
        raise InputError("--candidates names no model", "--candidates", "leave it out to rank the whole catalog")
    # A folder given twice (`tiny` and `tiny/`, or through a link) is one model: compared as resolved.
    # A catalog entry's Hugging Face id is that entry (any case, as the hub takes it).
    from tunesmith.models.catalog import CATALOG

    ids = {e.hf_id.lower(): e.name for e in CATALOG.values()}
    keys = [str(Path(n).expanduser().resolve()) if _exists(n) else ids.get(n.lower(), n) for n in names]
    if twice := next((n for i, (n, k) in enumerate(zip(names, keys)) if k in keys[:i]), None):
        raise InputError(f"--candidates names {twice} twice", "--candidates", "name each model once")
    return names


def _exists(name: str) -> bool:
    try:
        return Path(name).expanduser().exists()
    except OSError:  # a name past the file system's limits names no file (select says so, naming --candidates)
        return False


@app.command("select")
def select_command(config: Path = typer.Argument(..., help="project.yaml"),
                   candidates: Optional[str] = typer.Option(None, "--candidates",
                                                            help="Comma-separated models (default: the catalog)."),
                   probe: int = typer.Option(50, "--probe", min=0, help="Validation rows for the zero-shot probe."),
                   as_json: bool = typer.Option(False, "--json"), quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Rank models and techniques for this data and hardware (estimates + zero-shot probe)."""
    def go() -> int:
        from tunesmith.config import load_config
        from tunesmith.select import select

        names = _candidate_names(candidates)
        result = select(load_config(config), names, probe, progress=not quiet)
        if as_json:
            print(json.dumps(result, indent=2))
            return 0
        hw, data = result["hardware"], result["data"]
        print(f"hardware: {hw['name']} ({hw['device']}), {hw['memory_mb']:,.0f} MB, matmul peak "
              f"{hw['peak_tflops']:.2f} TFLOP/s{' bf16' if hw['bf16'] else ''}")
        print(f"data: {data['train_rows']} training rows, {data['row_tokens']} tokens per row, "
              f"{data['train_tokens']:,} tokens over {data['epochs']:.3g} epoch(s)")
        for warning in data["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{'model':<26}{'params':>8}{'context':>9}{'licence':>22}{'probe':>8}  memory MB / minutes: "
              + " | ".join(result["candidates"][0]["estimates"]))
        for r in result["candidates"]:
            probe_s = f"{r['probe']['score']:.3f}" if r.get("probe") else ("-" if r["local"] else "remote")
            est = " | ".join(f"{e['memory_mb']:,}/{e['seconds'] / 60:.1f}{'' if e['fits'] else '!'}"
                             for e in r["estimates"].values())
            print(f"{r['model']:<26}{r['params_m']:>7}M{r['context']:>9}{r['licence'][:21]:>22}{probe_s:>8}  {est}")
        rec = result["recommendation"]
        print(f"recommendation: {rec['model']} with {rec['method']} ({rec['reason']})")
        print("(! = does not fit this machine's memory; remote = weights not on this machine, not probed)")
        return 0
    _guarded(debug, go)


@app.command("serve")
def serve_command(targets: Optional[list[Path]] = typer.Argument(None, help="a run directory, or a model name / "
                                                                             "checkpoint (or --registry NAME instead)"),
                  host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0: every one)."),
                  port: int = typer.Option(8000, "--port"),
                  variant: Optional[str] = typer.Option(None, "--variant",
                                                        help="Variant to serve (default: the one optimize selected)."),
                  api_keys_file: Optional[Path] = typer.Option(None, "--api-keys-file",
                                                               help="One API key per line (also TUNESMITH_API_KEYS)."),
                  engine: Optional[str] = typer.Option(None, "--engine", help="builtin (the default), or vllm "
                                                       "(vLLM runs the model, tunesmith the sidecar)."),
                  upstream: Optional[str] = typer.Option(None, "--upstream",
                                                         help="With --engine vllm: URL of a running OpenAI-compatible "
                                                              "server to front instead of starting vLLM."),
                  upstream_api_key_env: Optional[str] = typer.Option(
                      None, "--upstream-api-key-env", help="With --upstream: environment variable holding the key "
                                                           "the upstream server expects (sent as Bearer)."),
                  upstream_model: Optional[str] = typer.Option(None, "--upstream-model", help="With --upstream: "
                                                               "the model name to request (default: the run's name)."),
                  lora: bool = typer.Option(False, "--lora", help="With --engine vllm: load the run's LoRA adapter "
                                                                  "on its base even where whole weights exist."),
                  print_vllm_command: bool = typer.Option(False, "--print-vllm-command", help="Print one vLLM command "
                                                          "serving the LoRA adapters of the runs given (one base)."),
                  insecure_no_auth: bool = typer.Option(
                      False, "--insecure-no-auth", help="Serve without API keys on a non-loopback --host "
                                                        "(refused otherwise)."),
                  registry: Optional[str] = typer.Option(
                      None, "--registry", help="Serve the run promoted under this name (`tunesmith promote`) "
                                               "and swap in the next one promoted or rolled back to, "
                                               "without dropping a request (instead of TARGET)."),
                  debug: bool = DEBUG) -> None:
    """Serve a model over HTTP: OpenAI-compatible completions and chat, /v1/classify, /metrics."""
    def go() -> int:
        from tunesmith.errors import InputError
        from tunesmith.serve.server import one_target, print_shared_vllm_command, serve

        if print_vllm_command:  # the options it does not use are refused, not ignored
            return print_shared_vllm_command(targets or [], host, port, {
                "--engine": engine, "--lora": lora, "--upstream": upstream, "--upstream-model": upstream_model,
                "--upstream-api-key-env": upstream_api_key_env, "--variant": variant, "--registry": registry,
                "--api-keys-file": api_keys_file, "--insecure-no-auth": insecure_no_auth})
        if engine not in (None, "builtin", "vllm"):
            raise InputError(f"unknown engine '{engine}'", "--engine", "use builtin or vllm")
        serve(one_target(targets), host, port, variant, api_keys_file, engine or "builtin", upstream,
              insecure_no_auth, upstream_api_key_env, registry, lora, upstream_model)
        return 0
    _guarded(debug, go)


@app.command("monitor")
def monitor_command(run_dir: Path = typer.Argument(..., help="a served run directory"),
                    db: Optional[Path] = typer.Option(None, "--db",
                                                      help="Request log (default RUN_DIR/monitor/requests.db)."),
                    window: Optional[int] = typer.Option(None, "--window", help="Newest requests to compare."),
                    alerts: Optional[Path] = typer.Option(None, "--alerts",
                                                          help="Also write alert rules, dashboard, "
                                                               "prometheus.yml here."),
                    since: Optional[float] = typer.Option(None, "--since", help="Live quality over the last "
                                                          "HOURS only (default: up to 30 windows)."),
                    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
                    debug: bool = DEBUG) -> None:
    """Drift of live traffic against the training data, live quality on feedback-labelled traffic
    against the accepted test figure, and whether to retrain."""
    def go() -> int:
        from tunesmith.serve.alerts import check_out
        from tunesmith.serve.quality import quality_lines
        from tunesmith.serve.server import monitor, write_alerts

        if alerts is not None:
            check_out(alerts)  # before the report's work; the files only once it is done
        report = monitor(run_dir, db, window, since)
        for path in write_alerts(run_dir, alerts) if alerts is not None else []:
            print(f"wrote {path}", file=sys.stderr if as_json else sys.stdout)
        if as_json:
            print(json.dumps(report, indent=2))
            return 0
        print(f"drift report over the newest {report['requests']} requests")
        for name, s in report["signals"].items():
            print(f"  {'DRIFT' if s['drift'] else 'ok   '} {name}: {s['score']} (threshold {s['threshold']})")
        for line in quality_lines(report["quality"]):
            print(line)
        print(f"recommendation: {report['recommendation']} ({report['reason']})")
        return 0
    _guarded(debug, go)


# Registered last so that `tunesmith --help` lists the stage commands first.
cli_data.register(app)  # data check|clean|augment|split|report|pairs and human export|import (cli/data.py)
cli_loop.register(app)  # feedback, retrain, promote, rollback: the production loop (cli/loop.py)
cli_ui.register(app)  # the web workbench (cli/ui/)


def main() -> None:
    """The console entry point (`tunesmith`)."""
    run_app(app)

if __name__ == "__main__":
    main()

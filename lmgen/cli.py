"""The ``lmgen`` console entry point: ``lmgen run | sweep | eval | export-hf | plot | ui``.

Every subcommand that runs something takes an experiment YAML plus dotlist overrides, a
preset chosen by name among them:
``lmgen run experiments/base.yaml tokenizer=jpeg_q25 train.images=3200 lm.size=nano``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmgen.config import ConfigError, ExperimentConfig, load_config, to_dict
from lmgen.paths import as_disk_full, check_inputs, safe_component
from lmgen.processes import die_with_parent


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Lightning prints its own messages; without this they appear twice.
    logging.getLogger("lightning").propagate = False
    # Lightning suggests workers for tiny in-memory token datasets; not useful advice here.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # TokenDataModule resumes mid-epoch itself (EpochSampler), which Lightning cannot see.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def cmd_run(args: argparse.Namespace) -> int:
    die_with_parent()  # a sweep's point does not outlive its sweep
    try:
        cfg = load_config(args.experiment, args.overrides)
    except ConfigError as err:
        print(f"lmgen: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    try:
        home = preflight(cfg)
    except ConfigError as err:
        print(f"lmgen: config error: {err}", file=sys.stderr)
        return 2
    from lmgen.concurrency import is_global_zero
    from lmgen.experiment import run_experiment  # heavy imports only when something runs

    try:
        summary = run_experiment(cfg, resume=args.resume)
    except OSError as err:
        full = as_disk_full(err, home)
        if full is None:
            raise
        print(f"lmgen: {full}", file=sys.stderr)  # the run is FAILED in MLflow, with this as its lmgen.error
        return 1
    if is_global_zero():  # the other ranks of a distributed run have nothing of their own to report
        print("\n" + summary.format())
        print(f"\nopen the MLflow UI with: lmgen ui   (store: {summary.tracking_uri})")
    return 0


def preflight(cfg: ExperimentConfig) -> Path:
    """What a run needs from this machine, checked before anything is created: the inputs its
    config names exist (``lmgen.paths.check_inputs``) and ``$LMGEN_HOME`` takes a file; returns
    the home. ConfigError naming the key (or ``LMGEN_HOME``) and the path otherwise."""
    from lmgen.tracking import writable_home

    try:
        check_inputs(cfg.data, cfg.tokenizer)
        return writable_home()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _on_a_run(command: str, action: Callable[[], Any], errors: tuple[type[Exception], ...] = ()) -> tuple[int, Any]:
    """(0, action()) — or (2, None) with the message on stderr when it raises a config error, a
    missing file or a bad value (an unknown run, a run of the wrong kind) or one of ``errors``."""
    try:
        return 0, action()
    except ConfigError as err:
        print(f"lmgen: config error: {err}", file=sys.stderr)
    except (*errors, FileNotFoundError, ValueError) as err:
        print(f"lmgen {command}: {err}", file=sys.stderr)
    return 2, None


def _in_home(action: Callable[[], Any]) -> Callable[[], Any]:
    """``action`` once ``$LMGEN_HOME`` takes a file (a ValueError naming it and the path at once
    otherwise, rather than the tracking store's minutes of retries and a traceback)."""
    from lmgen.tracking import writable_home

    return lambda: (writable_home(), action())[1]


def cmd_eval(args: argparse.Namespace) -> int:
    from lmgen.experiment import eval_run  # heavy imports only when something runs

    code, summary = _on_a_run("eval", _in_home(lambda: eval_run(args.run_id, args.overrides, uri=args.uri)))
    if code == 0:
        print("\n" + summary.format())
    return code


def cmd_export_hf(args: argparse.Namespace) -> int:
    from lmgen.hf_export import MissingTransformers, export_run  # heavy imports only when something runs

    code, export = _on_a_run("export-hf", _in_home(lambda: export_run(args.run_id, args.out_dir, uri=args.uri)),
                             (MissingTransformers,))
    if code:
        return code
    card = export.card
    print(f"wrote {export.out_dir}: {', '.join(export.files)}")
    prompt = (f"class c -> [{card['class_offset']} + c] (c < {card['num_classes']}), null class {card['null_class']}"
              if card["class_conditional"] else f"[{card['bos_id']}] (BOS)")
    print(f"image ids [0, {card['vocab_size']}), up to {card['max_tokens']} per image; prompt {prompt}; "
          f"EOS {card['eos_id'] if card['variable_length'] else 'none (fixed grid)'}")
    print(f"load with: transformers.LlamaForCausalLM.from_pretrained({str(export.out_dir)!r})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lmgen.sweep import SweepStopped, plan_sweep, run_sweep, summary_table

    try:
        if args.dry_run:  # validate every point, show what would run
            _, points, hashes = plan_sweep(args.sweep)
            for p in points:
                print(f"{p.name}\t{hashes[p.name]}\tlmgen run {' '.join(p.argv())}")
            return 0
        results = run_sweep(args.sweep, launcher=args.launcher, max_parallel=args.max_parallel, uri=args.uri,
                            slurm_cluster=args.slurm_cluster)
    except ConfigError as err:
        print(f"lmgen: config error: {err}", file=sys.stderr)
        return 2
    except SweepStopped as stopped:
        print("\n" + summary_table(stopped.results))
        print(f"\nlmgen sweep: {stopped}; the sweep's run and its stopped points are KILLED. Rerun the same command "
              "to resume them (finished points are skipped).", file=sys.stderr)
        return 128 + stopped.signum
    except OSError as err:  # the sweep's own writes (point logs, its parent run's summary)
        from lmgen.tracking import home_path

        full = as_disk_full(err, home_path())
        if full is None:
            raise
        print(f"lmgen: {full}", file=sys.stderr)
        return 1
    print("\n" + summary_table(results))
    if not args.no_plot:
        from lmgen.sweep import load_sweep

        _sweep_report(load_sweep(args.sweep).name, args.uri)
    for r in results:
        if r.error:
            print(f"\n--- {r.name} ({r.status}), last lines of its log:\n{r.error}", file=sys.stderr)
    failed = [r.name for r in results if r.status not in ("FINISHED", "SKIPPED")]
    if failed:
        print(f"\n{len(failed)} point(s) did not finish: {', '.join(failed)}; rerun the same command to retry "
              "them (finished points are skipped)", file=sys.stderr)
    return 1 if failed else 0


def _sweep_report(name: str, uri: str | None) -> None:
    """``lmgen plot`` for a sweep that just ran; a plotting error never fails the sweep."""
    from analysis.report import plot_experiment

    try:
        report = plot_experiment(name, tracking_uri=uri)
    except Exception as err:  # the runs are safe in MLflow; `lmgen plot` can redo this
        print(f"lmgen: the sweep's report failed ({type(err).__name__}: {err}); retry with "
              f"lmgen plot --experiment {name}", file=sys.stderr)
        return
    print(f"\nreport: {report.html} (and report.md; {len(report.written)} figures, {len(report.skipped)} skipped; "
          f"also logged to the sweep's parent run)")


def cmd_plot(args: argparse.Namespace) -> int:
    from analysis.report import plot_experiment  # pandas/matplotlib only when plotting

    formats = [f for f in args.formats.split(",") if f]
    try:
        if args.out is None:  # the report's folder is $LMGEN_HOME/reports/<experiment>
            safe_component("--experiment", args.experiment)
        report = plot_experiment(args.experiment, args.out, tracking_uri=args.uri, formats=formats, dpi=args.dpi,
                                 log_to_mlflow=not args.no_log)
    except ValueError as err:
        print(f"lmgen plot: {err}", file=sys.stderr)
        return 2
    for name, files in report.written.items():
        print(f"wrote {name}: {', '.join(str(f) for f in files)}")
    for name, why in report.skipped.items():
        print(f"skipped {name}: {why}")
    for name, why in report.failed.items():
        print(f"FAILED {name}: {why}", file=sys.stderr)
    print(f"report: {report.html} and {report.markdown.name}")
    return 1 if report.failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from analysis.compare import compare_experiment, render  # pandas/scipy only when comparing

    try:
        comparison = compare_experiment(args.experiment, args.reference, tracking_uri=args.uri)
    except ValueError as err:
        print(f"lmgen compare: {err}", file=sys.stderr)
        return 2
    print(render(comparison, "markdown" if args.markdown else "text"))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from lmgen.processes import run_until_stopped
    from lmgen.tracking import latest_experiment, lmgen_home, resolve_tracking_uri, runs_table_url

    uri = resolve_tracking_uri(args.uri)
    base = f"http://{args.host}:{args.port}"
    found = latest_experiment(uri, args.experiment)
    if args.experiment and found is None:
        print(f"lmgen ui: no experiment {args.experiment!r} in {uri}", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port)]
    if uri.startswith("sqlite:///"):
        command += ["--default-artifact-root", (lmgen_home() / "mlartifacts").as_uri()]
    where = f"runs of {found[1]!r}: {runs_table_url(base, found[0])}" if found else f"{base} (no experiment yet)"
    print(f"MLflow UI on {where}  (store: {uri}); Ctrl-C stops it", flush=True)
    env = os.environ.copy()
    # The server's background job workers (GenAI evaluation jobs) cost ~8 processes of
    # ~250 MB each and lmgen never submits jobs: off unless the user asks for them.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return run_until_stopped(command, env)  # a stopped `lmgen ui` takes the server and its workers with it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmgen", description="Tokenization design space of AR image generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train + sample one experiment, tracked in MLflow")
    run.add_argument("experiment", type=Path, help="experiment YAML (deltas from the schema)")
    run.add_argument("overrides", nargs="*", help="presets and dotlist overrides, e.g. tokenizer=vq_1k lm.size=mini "
                                                   "train.images=6400")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("--resume", action="store_true", help="skip if a FINISHED run of this config exists; continue "
                                                           "an unfinished one from its last.ckpt")
    run.set_defaults(func=cmd_run)

    sw = sub.add_parser("sweep", help="run every point of a sweep file (a grid over experiments), idempotently")
    sw.add_argument("sweep", type=Path, help="sweep YAML (sweeps/*.yaml)")
    sw.add_argument("--launcher", choices=("local", "slurm"), default="local")
    sw.add_argument("--max-parallel", type=int, default=None, help="local launcher: points at once "
                                                                  "(default: the file's max_parallel, else 1)")
    sw.add_argument("--dry-run", action="store_true", help="validate every point and print them; run nothing")
    sw.add_argument("--no-plot", action="store_true", help="skip the report (lmgen plot) written after the points")
    sw.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or the SQLite store)")
    sw.add_argument("--slurm-cluster", choices=("slurm", "local", "debug"), default="slurm",
                    help="submitit backend of the slurm launcher; local runs the jobs as processes here (testing)")
    sw.set_defaults(func=cmd_sweep)

    ev = sub.add_parser("eval", help="re-evaluate a finished LM run from its checkpoint (more samples, other "
                                     "sampling settings) into a child run")
    ev.add_argument("run_id", help="MLflow run id of an LM run (tag lmgen.stage=lm)")
    ev.add_argument("overrides", nargs="*", help="sample.*, metrics.* and seed overrides, e.g. sample.num_samples=1000")
    ev.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or the SQLite store)")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export-hf", help="write a finished LM run as a transformers LlamaForCausalLM checkpoint "
                                          "(+ lmgen.json: the sequence layout to prompt and decode it)")
    ex.add_argument("run_id", help="MLflow run id of an LM run (tag lmgen.stage=lm) trained with train.checkpoint")
    ex.add_argument("out_dir", type=Path, help="output folder (created; files in it are overwritten)")
    ex.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or the SQLite store)")
    ex.set_defaults(func=cmd_export_hf)

    pl = sub.add_parser("plot", help="paper-style figures, a results table and report.md from an experiment's runs")
    pl.add_argument("--experiment", required=True, help="MLflow experiment or sweep name, e.g. quickstart")
    pl.add_argument("--out", type=Path, default=None, help="output folder (default: $LMGEN_HOME/reports/EXPERIMENT)")
    pl.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or the SQLite store)")
    pl.add_argument("--formats", default="png,pdf", help="comma-separated figure formats (default: png,pdf)")
    pl.add_argument("--dpi", type=int, default=150, help="PNG resolution (default: 150)")
    pl.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    pl.set_defaults(func=cmd_plot)

    cp = sub.add_parser("compare", help="paired verdicts: each arm against a reference tokenizer, metric by metric "
                                        "(95%% intervals over seeds, Holm-corrected verdicts)")
    cp.add_argument("experiment", help="MLflow experiment or sweep name, e.g. quickstart")
    cp.add_argument("--reference", default=None, help="reference tokenizer: a preset, label or family, e.g. vq_1k "
                                                      "(default: the first vq arm)")
    cp.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or the SQLite store)")
    cp.add_argument("--markdown", action="store_true", help="print a markdown table instead of aligned text")
    cp.set_defaults(func=cmd_compare)

    ui = sub.add_parser("ui", help="open the MLflow UI on the lmgen store")
    ui.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or the SQLite store)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--experiment", default=None, help="the experiment whose runs table to open (default: the one "
                                                        "updated last)")
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

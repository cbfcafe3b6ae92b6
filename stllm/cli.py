"""Command line: stllm train | distill | evaluate | predict | demo | explain; a thin layer over `stllm.train` and
the model object (`STLLM.from_pretrained(run)`, then its predict / evaluate / explain)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from stllm.report import add_report_parser, cmd_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stllm", description="LLM-based spatiotemporal forecasting")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run from a YAML config")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-4")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--notes", metavar="FILE.csv", help="notes CSV: dated text about places (sets data.notes; "
                   "docs/data_formats.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("distill", help="write a teacher's rationales (the explain section of a config) as a "
                       "datasets dataset and JSONL")
    p.add_argument("--config", required=True, help="YAML config with an explain: section (e.g. "
                   "configs/beijing-pm25-explain.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. "
                   "explain.n_samples=64 explain.teacher=openai:gpt-4o-mini explain.teacher_url=...")
    p.add_argument("--out", required=True, help="folder to write")

    p = sub.add_parser("evaluate", help="metrics of a run next to the baselines")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--data", help="dataset name or path (default: the run's own dataset)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--batch-size", type=positive_int, default=16)
    _add_inference_options(p)
    add_data_option(p)

    p = sub.add_parser("predict", help="write forecasts to .npz or .csv")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--data", required=True, help="dataset name or path")
    p.add_argument("--out", required=True, help="FILE.npz or FILE.csv")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--last", action="store_true", help="only the forecast after the data's last step")
    p.add_argument("--batch-size", type=positive_int, default=16)
    _add_inference_options(p)
    add_data_option(p)

    p = sub.add_parser("demo", help="train briefly on a synthetic city with SmolLM2, evaluate, plot")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--steps", type=positive_int, help="training budget per model in optimizer steps (default: "
                   "configs/demo.yaml's train.max_steps)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("explain", help="forecast one sensor at one time and explain it (checked against the data)")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--data", help="dataset name or path (default: the run's own dataset)")
    p.add_argument("--node", required=True, help="sensor id, name or position")
    p.add_argument("--at", required=True, help="timestamp of the first forecast step, e.g. '2016-05-01 08:00'")
    p.add_argument("--mode", choices=["analytic", "generated"], help="analytic: rationale rendered from computed "
                   "facts; generated: written by the run's LM (default: the run's explain.mode)")
    p.add_argument("--channel", help="channel to explain (default: the first)")
    p.add_argument("--notes", metavar="FILE.csv", help="notes CSV for the data (default: the run's data.notes on "
                   "its own dataset)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw history, forecast and truth")
    p.add_argument("--max-new-tokens", type=int, help="bound on generated tokens (default: "
                   "768 for a writer, the run's explain.max_new_tokens for a slot student)")
    p.add_argument("--quantize", choices=["none", "int8", "nf4"], help="load the backbone in 8 or 4 bits (bitsandbytes)")
    add_data_option(p)

    add_report_parser(sub)   # stllm report: a self-contained HTML page (stllm/report.py)

    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):  # transformers' own bars too (loading weights)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        return {"train": cmd_train, "distill": cmd_distill, "evaluate": cmd_evaluate, "predict": cmd_predict,
                "demo": cmd_demo, "explain": cmd_explain, "report": cmd_report}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as err:
        print(f"stllm {args.command}: error: {err}", file=sys.stderr)
        return 2


def _add_inference_options(p) -> None:
    p.add_argument("--quantize", choices=["none", "int8", "nf4"], help="load the backbone in 8 or 4 bits (bitsandbytes)")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA into the backbone weights (not with --quantize)")
    p.add_argument("--notes", metavar="FILE.csv", help="notes CSV for the data: dated text about places (default: "
                   "the run's data.notes on its own dataset)")
    p.add_argument("--channels", nargs="*", default=[], metavar="TARGET=RUN",
                   help="map the data's channels onto the run's, e.g. departures=0 (names or positions)")
    p.add_argument("--resample", choices=["sum", "mean"], help="resample the data to the run's interval")
    p.add_argument("--adapt-steps", type=non_negative_int, default=0,
                   help="test-time adaptation: self-supervised steps on the data's input history (default 0 = off)")


def add_data_option(p) -> None:
    """--data-option KEY=VALUE ...: loader options for --data (e.g. city=Milan), as data.options in a config."""
    p.add_argument("--data-option", dest="data_options", action="extend", nargs="+", type=data_option, default=[],
                   metavar="KEY=VALUE", help="loader option for the data, repeatable: e.g. city=Milan "
                   "'domain=pedestrian counts' units=[people] holidays=IT (values read as YAML, as --set; "
                   "docs/data_formats.md)")


def data_option(text: str) -> tuple[str, object]:
    """argparse type: 'city=Milan' -> ('city', 'Milan'); the value is read as YAML ('3' -> 3, '[a, b]' -> a list),
    except that a word YAML 1.1 reads as a boolean stays a string unless it is true/false (holidays=NO is Norway)."""
    import yaml
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. city=Milan, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except Exception as err:                 # PyYAML raises several kinds
        raise argparse.ArgumentTypeError(f"{text!r}: not valid YAML: {err}") from None
    if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
        parsed = value.strip()
    return key.strip(), parsed


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports `argument --batch-size: must be an integer >= 1`)."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def check_writable(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work is done, an output file that cannot be written: a folder, or a path whose nearest
    existing parent is not a folder or does not let us create files (missing folders are created at writing)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot write in {folder} ({err.strerror})") from None
    return path


def cmd_distill(args) -> int:
    from stllm.config import load_config
    from stllm.distill.student import write_rationales
    summary = write_rationales(load_config(args.config, args.set), args.out)
    print(f"{summary['n_rationales']} rationales by the {summary['teacher']} teacher on {summary['dataset']} "
          f"in {summary['seconds']:.1f} s, written to {args.out} (dataset/ and rationales.jsonl)")
    return 0


def cmd_train(args) -> int:
    from stllm.config import load_config
    from stllm.train import train
    cfg = load_config(args.config, [*args.set, *([f"data.notes={args.notes}"] if args.notes else [])])
    if cfg.explain.enabled:  # the explain recipe: the student trained with the joint regression + rationale loss
        from stllm.distill.student import train_student as train
        from stllm.distill.writer import WRITER_DIR
        run = Path(args.out) / WRITER_DIR if cfg.explain.form == "written" else Path(args.out)  # the writer's own
        if args.resume and (run / "config.yaml").is_file():   # train() checks its own runs
            from stllm.train import check_resume
            check_resume(cfg, run)
    metrics = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if not metrics:  # not the main process of a multi-process run
        return 0
    print(comparison_table(metrics, "stllm" if cfg.model.use_llm else "encoder only"))
    print(f"run written to {args.out}")
    return 0


def _load_run(args, merge_lora: bool = False):
    """The run of --run (quantized on --quantize, LoRA merged on --merge-lora), on the GPU when there is one.
    --data-option names are checked against --data's loader first, so a misspelt one costs no model loading."""
    if getattr(args, "data", None) and getattr(args, "data_options", None):
        from stllm.data.registry import check_options
        check_options(args.data, dict(args.data_options))
    from stllm.model import STLLM
    model = STLLM.from_pretrained(args.run, quantize=getattr(args, "quantize", None))
    if merge_lora:
        model.merge_lora()
    import torch
    if torch.cuda.is_available():
        model.to_device("cuda")
    return model


def _load_data(model, args):
    """The run's own dataset (with its config's options) or --data, fitted to the run's channels/interval."""
    from stllm.data.fit import load_for_run
    return load_for_run(model.meta, model.cfg.data, args.data, getattr(args, "channels", None),
                        getattr(args, "resample", None), getattr(args, "notes", None),
                        options=dict(getattr(args, "data_options", None) or []))


def _adapted(model, prep, args, before_last: bool = False):
    """--adapt-steps: the model adapted on the prepared data's input history before the first window used."""
    if not args.adapt_steps:
        return model
    from stllm.adapt import adapt
    before = prep.city.n_steps if before_last else int(prep.starts(args.split, why="--adapt-steps")[0])
    return adapt(model, prep, before=before, steps=args.adapt_steps)


def cmd_evaluate(args) -> int:
    if args.out:
        check_writable(args.out)
    model = _load_run(args, args.merge_lora)
    city = _load_data(model, args)
    prep = model.prepare(city)                     # once, for adapting and evaluating
    model = _adapted(model, prep, args)
    metrics = model.evaluate(prep, args.split, batch_size=args.batch_size)
    metrics.update({"run": str(args.run), "adapt_steps": args.adapt_steps})
    print(f"{city.name} ({args.split}, {metrics['n_windows']} windows, {city.n_nodes} nodes)"
          + (f", zero-shot from {metrics['source_dataset']}" if metrics["zero_shot"] else ""))
    print(comparison_table(metrics, "stllm" if model.backbone is not None else "encoder only"))
    if args.out:
        from stllm.checkpoint import atomic_write_text
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(metrics, indent=1))
    return 0


def cmd_predict(args) -> int:
    if Path(args.out).suffix not in (".npz", ".csv"):   # refused before the model is loaded, not after predicting
        raise ValueError(f"--out must end in .npz or .csv, got {args.out}")
    check_writable(args.out)
    model = _load_run(args, args.merge_lora)
    city = _load_data(model, args)
    prep = model.prepare(city)
    model = _adapted(model, prep, args, before_last=args.last)
    result = model.predict(prep, split=args.split, last=args.last, batch_size=args.batch_size)
    write_predictions(result, args.out)
    print(f"{len(result['starts'])} forecast window(s) for {city.n_nodes} nodes written to {args.out}")
    return 0


def comparison_table(metrics: dict, name: str = "stllm") -> str:
    """The run (row `name`) next to its baselines: forecast metrics, or event metrics for event classification."""
    from stllm.events import format_event_table
    from stllm.metrics import format_table
    rows = {name: metrics, **metrics["baselines"]}
    return format_event_table(rows) if "macro_f1" in metrics else format_table(rows)


def write_predictions(result: dict, path: str) -> None:
    """.npz with the arrays, or a long .csv: window_start, time, horizon, node, channel, prediction, truth."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez_compressed(path, prediction=result["prediction"], truth=result["truth"],
                            timestamps=result["timestamps"].astype("datetime64[s]").astype(str),
                            node_ids=np.array(result["node_ids"]), channels=np.array(result["channels"]))
    elif path.suffix == ".csv":
        import pandas as pd
        pred, truth, times = result["prediction"], result["truth"], result["timestamps"]
        b, h, n, c = pred.shape
        wi, hi, ni, ci = np.meshgrid(np.arange(b), np.arange(h), np.arange(n), np.arange(c), indexing="ij")
        frame = pd.DataFrame({"window_start": times[wi, 0].ravel(), "time": times[wi, hi].ravel(),
                              "horizon": hi.ravel() + 1, "node": np.array(result["node_ids"])[ni.ravel()],
                              "channel": np.array(result["channels"])[ci.ravel()],
                              "prediction": pred.ravel(), "truth": truth.ravel()})
        frame.to_csv(path, index=False)
    else:
        raise ValueError(f"--out must end in .npz or .csv, got {path}")


def cmd_demo(args) -> int:
    from stllm.demo import run_demo
    run_demo(args.out, steps=args.steps, progress=not args.quiet)
    return 0


def cmd_explain(args) -> int:
    """`stllm explain`: load the run and the data, explain one (node, time), print or write JSON, plot."""
    from stllm.explain import format_explanation, plot_explanation
    model = _load_run(args)
    city = _load_data(model, args)
    mode = args.mode or ("generated" if model.load_writer() is not None       # a run with a writer: its text
                         else model.cfg.explain.mode if model.backbone is not None else "analytic")
    result = model.explain(city, args.node, args.at, mode=mode, channel=args.channel or 0,
                           max_new_tokens=args.max_new_tokens)
    print(json.dumps(result, indent=1, ensure_ascii=False) if args.json else format_explanation(result))
    if args.plot:
        plot_explanation(result, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

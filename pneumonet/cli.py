"""The ``pneumonet`` command: a thin door that parses arguments and calls into the library.

Heavy imports (TensorFlow, Ray) happen inside the commands so that ``--help`` is instant.
Errors a user can cause print one line and exit 1; ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from pneumonet import __version__, console
from pneumonet.commandline import OVERRIDES_HELP, add_overrides, examples, parse, verbose_parent
from pneumonet.scoring.options import (
    SCORE_DESCRIPTION,
    SCORE_HELP,
    SERVE_HELP,
    add_score_arguments,
    add_serve_arguments,
)
from pneumonet.registry_commands import add_models_parser
from pneumonet.training.args import add_train_arguments

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger("pneumonet")


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


def cmd_data_summary(args: argparse.Namespace) -> None:
    from pneumonet.data.catalog import scan, summarize
    from pneumonet.data.explore import plot_class_distribution, plot_sample_grid

    manifest = scan(args.data)
    summary = summarize(manifest)
    if args.json:
        _print_json({"root": args.data, "splits": summary})
    else:
        print(f"dataset {args.data}")
        print(f"{'split':<8} {'NORMAL':>7} {'PNEUMONIA':>9} {'bacteria':>9} {'virus':>6} {'patients':>9} {'unusable':>9}")
        for split, c in summary.items():
            print(f"{split:<8} {c['NORMAL']:>7} {c['PNEUMONIA']:>9} {c['BACTERIA']:>9} {c['VIRUS']:>6} {c['patients']:>9} {c['unusable']:>9}")
    if args.plot:
        plot_class_distribution(summary, args.plot)
        log.info("class distribution written to %s", args.plot)
    if args.grid:
        plot_sample_grid(manifest, args.grid, seed=args.seed)
        log.info("sample grid written to %s", args.grid)


def cmd_data_synth(args: argparse.Namespace) -> None:
    from pneumonet.data.synthetic import synthesize_dataset

    root = synthesize_dataset(args.out, n=args.n, size=args.size, seed=args.seed)
    print(f"synthetic dataset written to {root}")


def cmd_train(args: argparse.Namespace) -> None:
    console.log_to(args.out or args.storage)
    from pneumonet.training.args import print_summaries, train_from_args

    print_summaries(train_from_args(args))


def _decode_settings(args: argparse.Namespace):
    """The ``data`` section a command on a trained model decodes with: ``--config`` when given, else the
    model's own config, with the overrides on top; None (the command's default) when neither is given."""
    if not args.config and not args.overrides:
        return None
    from pneumonet.artifact_meta import read_metadata
    from pneumonet.config import load_config

    base = None if args.config else read_metadata(args.model).get("config")
    return load_config(args.config, args.overrides, base=base).data


def cmd_evaluate(args: argparse.Namespace) -> None:
    console.log_to(args.out)
    from pneumonet.evaluation.metrics import headline
    from pneumonet.evaluation.run import evaluate_artifact

    metrics = evaluate_artifact(args.model, args.data, args.split, args.out, _decode_settings(args))
    source = metrics["threshold_source"]
    print(f"n {metrics['n']}  {headline(metrics)}  (threshold {metrics['threshold']:.3f}, the {source} one) → {args.out}")


def _site_policy(args: argparse.Namespace):
    """The threshold policy of ``calibrate``/``adapt`` from ``--min-sensitivity`` / ``--policy``."""
    from pneumonet.config import ThresholdConfig
    from pneumonet.errors import ConfigError

    if not 0.0 < args.min_sensitivity < 1.0:
        raise ConfigError(f"--min-sensitivity must be between 0 and 1 (exclusive), got {args.min_sensitivity:g}")
    if args.policy == "youden":
        return ThresholdConfig(policy="youden")
    return ThresholdConfig(policy="min_sensitivity", min_sensitivity=args.min_sensitivity)


def _print_site_record(record: dict, source: str, out: str) -> None:
    from pneumonet.evaluation.metrics import headline

    sample, site, before = record["sample"], record["at_site_threshold"], record["at_training_threshold"]
    print(f"site sample: {sample['n']} images of {sample['n_patients']} patients ({sample['n_positive']} pneumonia)")
    print(f"  source model, training threshold {record['training_threshold']:.3f}: {headline(before)}")
    print(f"  {source}, site threshold {record['threshold']:.3f}: {headline(site)}")
    if held := record.get("held_out_estimate"):
        print(f"  on patients it was not chosen on (threshold from one half, judged on the other, {held['splits']} splits): "
              f"accuracy {held['accuracy']:.3f}, sensitivity {held['sensitivity']:.3f}, specificity {held['specificity']:.3f}")  # fmt: skip
    if platt := record.get("platt"):
        print(f"  Platt scaling: Brier {platt['brier_before']:.3f} → {platt['brier_after']:.3f}, "
              f"ECE {platt['ece_before']:.3f} → {platt['ece_after']:.3f} (two-fold over the site's patients)")  # fmt: skip
    print(f"  (95% intervals resample whole patients) → {out}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    console.log_to(args.out)
    from pneumonet.evaluation.calibrate import calibrate_artifact

    record = calibrate_artifact(args.model, args.data, args.out, _site_policy(args), split=args.split,
                                recalibrate=args.recalibrate == "platt")  # fmt: skip
    _print_site_record(record, "calibrated" if record.get("platt") else "same model", f"calibrated artifact {args.out}")


def cmd_adapt(args: argparse.Namespace) -> None:
    console.log_to(args.out)  # TensorFlow's retracing notices and the like go to OUT/pneumonet.log
    from pneumonet.config import load_config
    from pneumonet.training.adapt import adapt_artifact

    cfg = load_config(args.config, args.overrides).adapt
    record = adapt_artifact(args.model, args.data, args.out, _site_policy(args), cfg, split=args.split, seed=args.seed)
    for fold in record["folds"]:
        print(f"fold {fold['fold']}: {fold['n']} held-out images of {fold['n_patients']} patients, "
              f"ROC-AUC {fold['roc_auc_before']:.3f} → {fold['roc_auc_after']:.3f}")  # fmt: skip
    print(f"ROC-AUC on the site sample: {record['roc_auc_before']:.3f} before, {record['roc_auc_out_of_fold']:.3f} adapted "
          "(out of fold: each image scored by a model that never saw its patient)")  # fmt: skip
    _print_site_record(record["calibration"], "adapted, out of fold", f"adapted artifact {args.out}")


def _add_site_arguments(parser: argparse.ArgumentParser, writes: str) -> None:
    """``--model/--data/--split/--out`` and the threshold policy, shared by ``calibrate`` and ``adapt``."""
    parser.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    parser.add_argument("--data", required=True, help="the site's labelled sample: test/{NORMAL,PNEUMONIA}/ or flat")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="the sample's split folder")
    parser.add_argument("--out", required=True, help=f"where the {writes} artifact goes (not the source)")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--min-sensitivity", type=float, default=0.95, metavar="S",
                        help="highest threshold with sensitivity >= S on the sample (default 0.95)")  # fmt: skip
    policy.add_argument("--policy", choices=("youden",), help="maximise sensitivity + specificity instead")


def cmd_drift_reference(args: argparse.Namespace) -> None:
    from pneumonet.artifact_meta import read_metadata
    from pneumonet.config import load_config
    from pneumonet.evaluation.reference import add_reference
    from pneumonet.registry import resolve_model

    base = None if args.config else read_metadata(resolve_model(args.model).uri).get("config")
    record = add_reference(args.model, args.data, args.out, load_config(args.config, args.overrides, base=base))
    ood = record["ood"]
    print(f"drift reference: {record['n_images']} validation images of {record['n_patients']} patients, "
          f"{record['n_vectors']} embeddings ({record['embedding_dim']} dimensions, {record['pca_components']} principal "
          f"components, {record['explained_variance_ratio']:.0%} of the variance); out of distribution beyond "
          f"{ood['threshold']:.1f}" + (f" or image statistics beyond {ood['image_threshold']:.1f}" if "image_threshold" in ood else "")
          + f" ({ood['held_out_flagged']:.1%} of held-out reference images) → {args.out}")  # fmt: skip


def cmd_predict(args: argparse.Namespace) -> None:
    from pneumonet.errors import ConfigError
    from pneumonet.scoring.predict import predict_files

    if not args.images:
        raise ConfigError("predict: no IMAGE given (only KEY=VALUE overrides)")
    results = predict_files(args.model, args.images, data=_decode_settings(args))
    if args.json:
        _print_json(results)
    else:
        for row in results:
            if row["error"]:
                print(f"{row['uri']}: ERROR {row['error']}")
            else:
                print(f"{row['uri']}: {row['prediction']}  p(PNEUMONIA)={row['probability']:.3f}")
    if any(row["error"] for row in results):
        sys.exit(1)


def cmd_score(args: argparse.Namespace) -> None:
    console.log_to(args.output, "_pneumonet.log")  # "_": readers of the Parquet folder skip it, as _summary.json
    from pneumonet.scoring.batch import run_from_args

    run_from_args(args)


def cmd_serve(args: argparse.Namespace) -> None:
    from pneumonet.config import load_config
    from pneumonet.scoring.online import serve_locally

    serve_locally(args.model, load_config(args.config, args.overrides), host=args.host, port=args.port)


def cmd_demo(args: argparse.Namespace) -> None:
    console.log_to(args.out)
    from pneumonet.demo import run_demo

    report = run_demo(args.out, args.overrides)
    print(f"demo report: {report}")


def _command(commands, name: str, help: str, *example_lines: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand that accepts ``-v`` and shows examples under its ``--help``."""
    return commands.add_parser(name, help=help, description=kwargs.pop("description", help), parents=[verbose_parent()],
                               epilog=examples(*example_lines), formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumonet", description="Pneumonia detection on chest X-rays.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples("pneumonet demo", "pneumonet train --data DATA --out runs/ --epochs 5",
                        "pneumonet COMMAND --help     (every command has its own examples)"),
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="show every library's log lines, debug logging, tracebacks")
    parser.add_argument("--version", action="version", version=f"pneumonet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = _command(commands, "data", "explore or synthesize datasets", "pneumonet data summary DATA",
                    "pneumonet data synth synthetic/ --n 400").add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")  # fmt: skip
    summary = _command(data, "summary", "counts per split, class, subtype and patients",
                       "pneumonet data summary ../shared/data/chest-xray-224 --plot classes.png --grid samples.png")  # fmt: skip
    summary.add_argument("data", help="dataset root (folder or s3://bucket/prefix)")
    summary.add_argument("--json", action="store_true", help="machine-readable output")
    summary.add_argument("--plot", help="write a class-distribution PNG here")
    summary.add_argument("--grid", help="write a PNG grid of sample images here")
    summary.add_argument("--seed", type=int, default=0, help="which samples the grid shows")
    summary.set_defaults(func=cmd_data_summary)

    synth = _command(data, "synth", "write a synthetic chest-X-ray-like dataset in the Kaggle layout",
                     "pneumonet data synth synthetic/ --n 400 --size 64")  # fmt: skip
    synth.add_argument("out", help="output folder")
    synth.add_argument("--n", type=int, default=200, help="training images")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)

    train = _command(
        commands, "train", "train one variant or all three (Ray Train, local Ray unless RAY_ADDRESS)",
        "pneumonet train --data ../shared/data/chest-xray-224 --out runs/ --variant custom --epochs 5",
        "pneumonet train --config configs/real-custom.yaml --data DATA --out runs/ train.batch_size=16",
        "pneumonet train --out runs/ --resume            (continue the latest run under runs/)",
    )  # fmt: skip
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    evaluate = _command(commands, "evaluate", "metrics and plots of a model artifact on a dataset split",
                        "pneumonet evaluate --model runs/custom --data ../shared/data/site-sample --out eval/",
                        "pneumonet evaluate --model runs/custom --data DATA --split val --out eval/ data.max_image_pixels=100000000")  # fmt: skip
    evaluate.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    evaluate.add_argument("--data", required=True, help="dataset root")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--out", required=True, help="where metrics.json and the PNGs go")
    add_overrides(evaluate, "data.decode_workers=2 (the data section decodes; default: the model's config)")
    evaluate.set_defaults(func=cmd_evaluate)

    calibrate = _command(
        commands, "calibrate", "choose the decision threshold on a site's labelled sample; writes a new artifact",
        "pneumonet calibrate --model runs/custom --data ../shared/data/site-sample --out runs/custom-site",
        "pneumonet calibrate --model runs/custom --data SAMPLE --out OUT --policy youden --recalibrate platt",
    )  # fmt: skip
    _add_site_arguments(calibrate, "calibrated")
    calibrate.add_argument("--recalibrate", choices=("platt",),
                           help="also refit the probabilities to the site (Platt scaling); decisions keep their order")  # fmt: skip
    calibrate.set_defaults(func=cmd_calibrate)

    adapt = _command(
        commands, "adapt", "fine-tune the custom CNN on a site's labelled sample; threshold and figures out of fold; writes a new artifact",
        "pneumonet adapt --model runs/custom --data ../shared/data/site-sample --out runs/custom-adapted",
        "pneumonet adapt --model runs/custom --data SAMPLE --out OUT --min-sensitivity 0.97 adapt.folds=5 adapt.epochs=8",
    )  # fmt: skip
    _add_site_arguments(adapt, "adapted")
    adapt.add_argument("--seed", type=int, default=0, help="folds, shuffling and dropout (default 0)")
    add_overrides(adapt, "adapt.epochs=8 adapt.learning_rate=5e-5 adapt.folds=5")
    adapt.set_defaults(func=cmd_adapt)

    reference = _command(
        commands, "drift-reference", "add a drift reference (validation scores and embeddings) to an artifact; writes a new one",
        "pneumonet drift-reference --model runs/custom --data ../shared/data/chest-xray-224 --out runs/custom-drift",
        "pneumonet drift-reference --model runs/custom --data DATA --out OUT drift.ood_quantile=0.995",
    )  # fmt: skip
    reference.add_argument("--model", required=True, help="model artifact folder or s3:// prefix (with its saved manifest)")
    reference.add_argument("--data", required=True, help="the dataset the model was trained on (its validation patients are used)")
    reference.add_argument("--out", required=True, help="where the new artifact goes (not the source)")
    add_overrides(reference, "drift.pca_components=16 (the drift and data sections; default: the model's config)")
    reference.set_defaults(func=cmd_drift_reference)

    predict = _command(commands, "predict", "score a few image files",
                       "pneumonet predict --model pneumonet-demo/models/custom chest1.jpeg chest2.dcm",
                       "pneumonet predict --model runs/custom --json big.png data.max_image_pixels=200000000")  # fmt: skip
    predict.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    predict.add_argument("images", nargs="+", metavar="IMAGE",
                         help="image files or s3:// URIs; KEY=VALUE config overrides may stand among them")  # fmt: skip
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    predict.add_argument("--config", help="YAML config file whose data section decodes (default: the model's config)")
    predict.set_defaults(func=cmd_predict, overrides=[])

    score = _command(commands, "score", SCORE_HELP,
                     "pneumonet score --model runs/custom --input ../shared/data/site-sample --output scores/",
                     "pneumonet score --model s3://B/models/custom/latest --input manifest.parquet --output s3://B/scores score.batch_size=32",
                     description=SCORE_DESCRIPTION)  # fmt: skip
    add_score_arguments(score)
    score.set_defaults(func=cmd_score)

    serve = _command(commands, "serve", SERVE_HELP, "pneumonet serve --model pneumonet-demo/models/custom --port 8000",
                     "pneumonet serve --model runs/custom serve.max_batch_size=32")  # fmt: skip
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    add_models_parser(commands)

    demo = _command(commands, "demo", "synthesize data, train all three variants briefly, write a report",
                    "pneumonet demo", "pneumonet demo --out /tmp/demo train.epochs=4")  # fmt: skip
    demo.add_argument("--out", default="pneumonet-demo", help="output folder (default: ./pneumonet-demo)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help=f"config overrides on top of pneumonet/configs/demo.yaml ({OVERRIDES_HELP})")  # fmt: skip
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parse(parser, argv, positional="images")
    console.configure(args.verbose)
    from pneumonet.errors import PneumonetError

    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except PneumonetError as exc:
        if args.verbose:
            log.exception("failed")
        print(f"pneumonet: error: {exc}", file=console.terminal())
        sys.exit(1)
    except KeyboardInterrupt:
        print("pneumonet: interrupted", file=console.terminal())
        sys.exit(130)
    except Exception as exc:
        if console.log_file():  # the traceback goes there (descriptor 2); say so where the user looks
            traceback.print_exc()
            print(f"pneumonet: unexpected error: {exc!r}; the traceback is in {console.log_file()}", file=console.terminal())
            sys.exit(1)
        raise
    finally:
        console.restore()


if __name__ == "__main__":
    main()

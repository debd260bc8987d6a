"""The `unified` command: a table of verbs, each a plain typed function whose signature builds its parser.

Positional parameters become positional arguments, keyword-only ones `--flags` (required when they have no
default); `bool` defaults become switches and `Literal` types become choices.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any

from unified.errors import UnifiedError

# verb -> (module, function, one-line help). Imports are lazy so that `unified --help` is instant.
VERBS: dict[str, tuple[str, str, str]] = {
    "data generate": ("unified.data.generate", "generate", "drive a scenario suite with the expert and store episodes"),
    "data info": ("unified.data.store", "data_info", "counts, expert figures and statistics of an episode store"),
    "data dagger": ("unified.data.dagger", "dagger", "drive with a learned policy, label with the expert, append"),
    "data operators": ("unified.data.operators", "operators", "write the multi-hop comparison (operator) data set"),
    "data scenarios": ("unified.sim.suite", "data_scenarios", "list the highway-env scenario ids a suite may use"),
    "data export-lerobot": ("unified.data.lerobot", "export_lerobot",
                            "write an episode store as a LeRobot v3 dataset (AV1 video, Parquet, statistics)"),
    "data import-lerobot": ("unified.data.lerobot", "import_lerobot",
                            "a local LeRobot v3 dataset (video frames, actions, state, tasks) -> an episode store"),
    "data tokenize": ("unified.data.tokenize", "tokenize", "encode a store once into memory-mapped token shards"),
    "data inspect": ("unified.data.inspect", "inspect_shards", "samples as readable tokens, packing efficiency"),
    "train": ("unified.launcher", "train", "train a recipe on N ranks through the DeepSpeed launcher"),
    "export": ("unified.export", "export", "a checkpoint -> a Hugging Face directory (Policy, WorldModel)"),
    "tokenizer fit": ("unified.tokenizers.fit", "fit", "fit the image, text and action tokenizers on an episode store"),
    "tokenizer eval": ("unified.tokenizers.evaluate", "evaluate", "PSNR, codebook usage, encode speed, action errors"),
    "eval closed-loop": ("unified.eval.closed_loop", "closed_loop", "drive a suite with a driver and report success"),
    "eval world-model": ("unified.eval.world_model", "world_model", "imagined vs real frames: PSNR, SSIM, accuracy"),
    "eval state-response": ("unified.eval.state_response", "state_response",
                            "does the policy steer by its heading and lane offset, as the expert does?"),
    "eval reasoning": ("unified.eval.reasoning", "reasoning", "generated explanations vs the simulator's causes"),
    "eval compare-reasoning": ("unified.eval.reasoning", "compare_reasoning",
                               "one lever on several training runs, by their reasoning: paired tests"),
    "eval operators": ("unified.eval.operators", "operators_eval", "multi-hop comparison accuracy by number of hops"),
    "eval plot-operators": ("unified.eval.operators", "plot_operators", "accuracy against hops of operator reports"),
    "eval operators-summary": ("unified.eval.operators", "summarize_operators",
                               "the length-generalisation table and plot over scratchpads and seeds"),
    "eval plot-training": ("unified.eval.training_plot", "plot_training", "loss curves per task of runs, as a PNG"),
    "eval distill": ("unified.eval.study", "distill", "teacher vs action-only students: the distillation study"),
    "eval ablation": ("unified.eval.ablation", "ablation", "what made the driver drive: one lever per row, a table"),
    "baseline fit-state-mlp": ("unified.eval.state_mlp", "fit_state_mlp",
                               "behaviour cloning from the ego state alone: a small MLP, a baseline to drive"),
    "serve": ("unified.serve", "serve", "serve an exported policy over HTTP (eval closed-loop --model http://...)"),
    "bench serve": ("unified.eval.latency", "serve_overhead",
                    "decision latency in process and through the policy server, on the same observations"),
    "bench train": ("unified.train_bench", "bench_train", "training tokens/s: the pipeline against a bare loop"),
    "bench latency": ("unified.eval.latency", "latency", "decision latency of models on the same observations"),
    "eval compare": ("unified.eval.closed_loop", "compare", "a Markdown table of closed-loop reports (--json files)"),
    "eval compare-runs": ("unified.eval.closed_loop", "compare_runs",
                          "one lever on several training runs: per-run and pooled paired tests"),
}
HIDDEN = {"progress"}  # parameters for Python callers only
# Every numeric option is a count (at least 1) unless named here; floats must be positive unless named here.
MINIMUM = {"seed": 0, "dump": 0, "videos": 0, "image_weight": 0.0, "ensemble": 0.0, "beta": 0.0}


def in_range(kind: type, name: str):
    """An argparse type that parses `kind` and refuses values below the option's minimum, naming both."""
    minimum = MINIMUM.get(name, 1 if kind is int else 0.0)
    strict = kind is float and name not in MINIMUM  # a float of 0 (a scale, a weight of nothing) means nothing

    def parse(raw: str):
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {raw!r}") from None
        if value < minimum or (strict and value <= minimum) or value != value:
            bound = f"more than {minimum}" if strict else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {raw}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_parameter(parser: argparse.ArgumentParser, p: inspect.Parameter, hint: Any) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    kwargs: dict[str, Any] = {}
    if origin is typing.Literal:
        kwargs["choices"] = list(args)
    elif hint in (int, float):
        kwargs["type"] = in_range(hint, p.name)
    elif hint in (Path, str):
        kwargs["type"] = hint
    if origin is list:
        kwargs["type"], kwargs["nargs"] = args[0], "+" if p.default is inspect.Parameter.empty else "*"
    if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
        if p.default is not inspect.Parameter.empty:
            kwargs["default"] = list(p.default) if isinstance(p.default, tuple) else p.default
        parser.add_argument(p.name, **kwargs)
        return
    flag = "--" + p.name.replace("_", "-")
    if hint is bool:
        parser.add_argument(flag, action="store_true", default=p.default)
    elif p.default is inspect.Parameter.empty:
        parser.add_argument(flag, required=True, dest=p.name, **kwargs)
    else:
        default = p.default
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(flag, default=default, dest=p.name, help=shown.strip() or None, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unified", description="unified: one transformer that is a driving policy and a world model"
    )
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    group_parsers: dict[str, argparse._SubParsersAction] = {}
    for verb, (module, function, help_text) in VERBS.items():
        group, _, action = verb.partition(" ")
        if not action:  # a verb of one word, e.g. `unified export`
            sub = groups.add_parser(group, help=help_text, description=help_text)
        else:
            if group not in group_parsers:
                group_parser = groups.add_parser(group, help=f"{group} commands")
                group_parsers[group] = group_parser.add_subparsers(dest="action", metavar="ACTION", required=True)
            sub = group_parsers[group].add_parser(action, help=help_text, description=help_text)
        sub.set_defaults(verb=verb)
        fn = getattr(importlib.import_module(module), function)
        hints = typing.get_type_hints(fn)
        for p in inspect.signature(fn).parameters.values():
            if p.name not in HIDDEN:
                _add_parameter(sub, p, hints.get(p.name, str))
    return parser


def main(argv: list[str] | None = None) -> int:
    # A shell starts background jobs with SIGINT ignored and children inherit that; Ctrl-C (or a SIGINT from
    # a supervisor) must always stop a command cleanly, keeping what it finished.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    verb = args.pop("verb")
    args.pop("group"), args.pop("action", None)
    module, function, _ = VERBS[verb]
    fn = getattr(importlib.import_module(module), function)
    try:
        fn(**args)
    except UnifiedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, a broken pipe: the file and the cause, no traceback
        from unified.outputs import disk_error

        print(f"error: {disk_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: `unified {verb}` stopped; what it finished is kept (rerun to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

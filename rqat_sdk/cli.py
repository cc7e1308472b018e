"""The ``rqat`` command line: run, validate, schema, recipes, demo, and the recipes of model repositories
(upgrade-recipe, reproduce, push).

Errors on bad input (any :class:`~rqat_sdk.errors.RqatError`) print as one message and exit with status 1;
only bugs print a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from dataclasses import fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any, get_args

from rqat_sdk import __version__, distributed, logs, oneshot
from rqat_sdk.data import describe_source
from rqat_sdk.errors import PreflightError, RqatError
from rqat_sdk.evaluation import EvalReport, evaluate, markdown_table, plot
from rqat_sdk.exporters import checkpoint_format
from rqat_sdk.files import check_writable, write_json_atomic, write_text_atomic
from rqat_sdk.generation import CACHE_IMPLEMENTATIONS
from rqat_sdk.modifiers.qat.modifier import QATKDModifier
from rqat_sdk.modifiers.qat.trainer import format_loss
from rqat_sdk.publish import plan_push, push
from rqat_sdk.recipe import Recipe, load_recipe
from rqat_sdk.recipe.repo import RECIPE_FILES
from rqat_sdk.recipe.schema import recipe_json_schema
from rqat_sdk.recipes import bundled
from rqat_sdk.reproduce import reproduce
from rqat_sdk.serving import serve_check, vllm_env
from rqat_sdk.session.engine import CHECKPOINTS, EVALUATION_FILE, check_output_dir
from rqat_sdk.session.options import DtypeName, KeepCheckpoints, RunOptions
from rqat_sdk.session.preflight import recipe_problems
from rqat_sdk.testbed.train import EMBEDDED


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    try:
        return args.handler(args)
    except RqatError as exc:
        print("\n".join([f"error: {exc}", *getattr(exc, "__notes__", [])]), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last finished stage", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rqat", description="Reasoning-QAT for low-bit reasoning LLMs.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging, llmcompressor's too")
    parser.add_argument("--version", action="version", version=f"rqat {_version()}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="apply a recipe to a model and write a compressed-tensors checkpoint")
    run.add_argument("recipe", help=f"a recipe file, a bundled recipe's name (see `rqat recipes`), or the recipe a "
                     f"repository carries ({' or '.join(RECIPE_FILES)}): a directory or ORG/NAME[@REVISION]")
    run.add_argument("--model", help="a local model directory, a Hugging Face hub id, a .gguf file (dequantized) or "
                     "gguf:smollm2-135m-instruct / gguf:gemma3-270m (default: the recipe's model)")
    run.add_argument("--output-dir", required=True, type=Path, help="where the checkpoint goes")
    _add_run_options(run)
    run.set_defaults(handler=_run)

    validate = commands.add_parser("validate", help="check a recipe's schema and semantics and say what a run would "
                                   "read (downloads the recipe only)")
    validate.add_argument("recipe", help="as for run")
    validate.add_argument("--json", action="store_true", help="print the resolved recipe as JSON")
    validate.set_defaults(handler=_validate)

    schema = commands.add_parser("schema", help="print the recipe JSON Schema (for editors and CI)")
    schema.add_argument("-o", "--output", type=Path, help="write to this file instead of standard output")
    schema.set_defaults(handler=_schema)

    evaluate = commands.add_parser("eval", help="pass@1 of a model or checkpoint on a reasoning benchmark")
    evaluate.add_argument("model", help="a model directory, an exported checkpoint, a hub id, a .gguf file "
                          "or gguf:NAME")
    evaluate.add_argument("--benchmark", default="testbed",
                          help="testbed, reasoning-gym:TASK[,TASK], a .jsonl file, gsm8k, math500, aime24, hf:ORG/NAME")
    evaluate.add_argument("--samples", type=int, default=3, help="answers per problem; pass@1 is their mean")
    evaluate.add_argument("--num-examples", type=int, default=200)
    evaluate.add_argument("--max-new-tokens", type=int, default=1024)
    evaluate.add_argument("--temperature", type=float, default=0.6)
    evaluate.add_argument("--top-p", type=float, default=0.95)
    evaluate.add_argument("--greedy", action="store_true", help="one greedy answer per problem")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--label", help="the name shown in tables and plots (default: the model)")
    evaluate.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                          help="transformers, or vLLM in its own environment (see serve-check --setup)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--cache-implementation", choices=CACHE_IMPLEMENTATIONS, default="dynamic",
                          help="hf backend: preallocated writes the KV cache in place (full-attention models); static "
                          "allocates it at full length, and transformers then compiles decoding on GPUs; cuda_graph "
                          "replays each decoding step from a CUDA graph (full-attention models, SDPA attention)")
    evaluate.add_argument("-o", "--output", type=Path, help="write the report (with every response) as JSON")
    evaluate.set_defaults(handler=_eval)

    compare = commands.add_parser("compare", help="table (and plot) of evaluation reports")
    compare.add_argument("reports", nargs="+", type=Path)
    compare.add_argument("--baseline", help="label of the report the others are compared with")
    compare.add_argument("--plot", type=Path, help="write a PNG bar chart here")
    compare.set_defaults(handler=_compare)

    serve = commands.add_parser("serve-check", help="serve a checkpoint with vLLM and compare with transformers")
    serve.add_argument("checkpoint", nargs="?", type=Path, help="an exported checkpoint directory")
    serve.add_argument("--setup", action="store_true", help="create the vLLM environment (several GB on disk) and exit")
    serve.add_argument("--max-tokens", type=int, default=16, help="greedy tokens compared per prompt")
    serve.add_argument("--python", help="the vLLM interpreter (default: RQAT_VLLM_PYTHON or the created one)")
    serve.add_argument("--require-identical", action="store_true", help="exit 1 unless every prompt matches")
    serve.add_argument("-o", "--output", type=Path, help="write the report as JSON")
    serve.set_defaults(handler=_serve_check)

    upgrade = commands.add_parser("upgrade-recipe", help="rewrite a recipe file in this rqat_sdk's format, fully "
                                  "resolved, and print the diff")
    upgrade.add_argument("recipe", type=Path)
    written = upgrade.add_mutually_exclusive_group()
    written.add_argument("-o", "--output", type=Path,
                         help="write the upgraded recipe here (default: print the diff only)")
    written.add_argument("--in-place", action="store_true", help="replace the recipe file")
    upgrade.set_defaults(handler=_upgrade_recipe)

    again = commands.add_parser("reproduce", help="re-run a checkpoint's recipe and compare with the published one")
    again.add_argument("checkpoint", help="an exported checkpoint directory or a hub repository ORG/NAME[@REVISION]")
    again.add_argument("--output-dir", type=Path, help="keep the re-run checkpoint here (default: a temporary one)")
    again.add_argument("--model", help="the base model, when the recorded one cannot be found")
    again.add_argument("--dataset", help="the dataset, when the recorded one was given in memory")
    again.add_argument("--allow-code", action="store_true", help="let the recipe import the Python code it names")
    again.add_argument("--device", default=RunOptions.device, help="as for run")
    again.add_argument("-o", "--output", type=Path, help="write the report as JSON")
    again.set_defaults(handler=_reproduce)

    push = commands.add_parser("push", help="publish an exported checkpoint, its model card and recipe to the hub")
    push.add_argument("checkpoint", type=Path)
    push.add_argument("repo", help="ORG/NAME (created if it does not exist)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    push.set_defaults(handler=_push)

    recipes = commands.add_parser("recipes", help="list the bundled recipes")
    recipes.set_defaults(handler=_recipes)

    demo = commands.add_parser("demo", help="Reasoning-QAT end to end on the embedded testbed model (CPU, minutes)")
    demo.add_argument("--recipe", default="testbed_w2g64", help="recipe file or bundled name (default: testbed_w2g64)")
    demo.add_argument("--output-dir", type=Path, default=Path("rqat-demo"),
                      help="default: ./rqat-demo (a previous demo's output is replaced)")
    demo.add_argument("--problems", type=int, default=150, help="held-out testbed problems per evaluation")
    demo.set_defaults(handler=_demo)
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`RunOptions` (but --output-dir, which each command declares), with its defaults."""
    defaults = RunOptions()
    parser.add_argument("--dataset", help="reasoning-gym:TASK[,TASK], a .jsonl file, a saved dataset dir, hf:ORG/NAME")
    parser.add_argument("--tokenizer", help="default: the model's own")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory when done")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last stage")
    parser.add_argument("--allow-code", action="store_true", help="let the recipe import the Python code it names")
    parser.add_argument("--device", default=defaults.device, help="auto (CUDA when available), cpu, cuda:N")
    parser.add_argument("--dtype", default=defaults.dtype, choices=get_args(DtypeName),
                        help="auto: the checkpoint's dtype (float32 for bf16/fp16 on a CPU without native bf16); "
                        "a GGUF: bf16 where the device computes it natively, else float32")
    parser.add_argument("--keep-checkpoints", default=defaults.keep_checkpoints, choices=get_args(KeepCheckpoints))


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`RunOptions` fields of parsed ``rqat run`` arguments, as keywords for ``oneshot``."""
    return {option.name: getattr(args, option.name) for option in fields(RunOptions)}


def _version() -> str:
    """The installed rqat-sdk's version (the package's own when it runs from a source tree)."""

    try:
        return metadata.version("rqat-sdk")
    except metadata.PackageNotFoundError:
        return __version__


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    result = oneshot(model=args.model, recipe=args.recipe, **_run_options(args))
    if distributed.is_main():  # under a launcher the other ranks export nothing and have nothing to report
        _print_summary(result.record, result.output_dir, time.perf_counter() - started)
    return 0


def _print_summary(record: dict, output_dir: Path | None, seconds: float) -> None:
    export = record.get("export", {})
    rows = [
        ("output", str(output_dir)),
        ("scheme", f"{record.get('scheme')} ({export.get('format', '-')})"),
        ("stages", ", ".join(f"{s['name']} {s['seconds']:.1f}s" for s in record.get("stages", []))),
        *(("training", line) for line in _training_lines(record.get("stages", []))),
        ("size", f"{export.get('bytes_on_disk', 0) / 2**20:.2f} MiB"),
        (
            "reload check",
            ("identical logits" if export.get("exact") else f"max |logit diff| {export.get('max_abs_logit_diff')}")
            if export
            else "-",
        ),
        ("time", f"{seconds:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _training_lines(stages: list[dict]) -> list[str]:
    """What each training stage changed: its final loss and the share of weight codes that moved."""

    lines = []
    for stage in stages:
        for modifier, metrics in (stage.get("metrics") or {}).items():
            if "codes_changed" in metrics:
                loss = f"final loss {format_loss(metrics['final_loss'])}, " if "final_loss" in metrics else ""
                lines.append(f"{stage['name']} ({modifier}): {loss}{100 * metrics['codes_changed']:.2f}% of weight "
                             f"codes changed")
    return lines


def _validate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    if problems := recipe_problems(recipe):
        raise PreflightError(problems)
    if args.json:
        print(json.dumps(recipe.model_dump(mode="json"), indent=2))
        return 0
    print(f"recipe {recipe.name or args.recipe}: valid")
    if recipe.origin is not None:
        print(f"  read from {recipe.origin.label} (nothing else was downloaded)")
    print(f"  model: {recipe.model or 'none named; a run needs --model'}")
    print(f"  scheme {recipe.scheme.label}: {recipe.scheme.describe()}; exported as {checkpoint_format(recipe.scheme)}")
    for index, stage in enumerate(recipe.stages):
        source = describe_source(stage.data.source) if stage.data.source is not None else "the run's --dataset"
        needs_data = any(m.needs_data for m in stage.modifiers)
        data = f"; data: {source}, {stage.data.num_samples} samples" if needs_data else ""
        teachers = "".join(f"; teacher: {m.teacher}" for m in stage.modifiers
                           if isinstance(m, QATKDModifier) and m.teacher)
        print(f"  stages[{index}] {stage.name}: {', '.join(m.type for m in stage.modifiers)}{data}{teachers}")
    if (evaluation := recipe.export.evaluate) is not None:
        print(f"  evaluation: {evaluation.num_examples} problems of {evaluation.benchmark}")
    for path, ref in recipe.code_references():
        print(f"  note: {path} names Python code ({ref}); running it needs --allow-code")
    for warning in recipe.warnings():
        print(f"  warning: {warning}")
    return 0


def _upgrade_recipe(args: argparse.Namespace) -> int:
    upgraded = Recipe.from_file(args.recipe).to_yaml()  # refuses a newer format, naming the version it needs
    original = args.recipe.read_text(encoding="utf-8")
    diff = difflib.unified_diff(original.splitlines(keepends=True), upgraded.splitlines(keepends=True),
                                str(args.recipe), "upgraded")
    sys.stdout.writelines(diff)
    if target := args.output or (args.recipe if args.in_place else None):
        write_text_atomic(target, upgraded)
        print(f"wrote {target}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    if args.output:
        check_writable(args.output)  # before the run, whose report would otherwise be lost
    found = reproduce(args.checkpoint, output_dir=args.output_dir, model=args.model, dataset=args.dataset,
                      allow_code=args.allow_code, device=args.device)
    if args.output:
        write_json_atomic(args.output, found.to_dict())
    print(f"{found.published}: {found.verdict}")
    for label, lines in (("", found.findings), ("not reproduced: ", found.not_reproduced), ("note: ", found.notes)):
        for line in lines:
            print(f"  {label}{line}")
    return 0 if found.reproduced else 1


def _push(args: argparse.Namespace) -> int:
    plan = plan_push(args.checkpoint, args.repo)
    print(f"{'would upload' if args.dry_run else 'uploading'} {len(plan.files)} files "
          f"({plan.bytes / 2**20:.2f} MiB) from {plan.directory} to {plan.repo_id}:")
    for name in plan.files:
        print(f"  {name}")
    if not args.dry_run:
        print(f"pushed: {push(plan, private=args.private)}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    text = json.dumps(recipe_json_schema(), indent=2) + "\n"
    if args.output:
        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.output:
        check_writable(args.output)  # before the evaluation, whose results would otherwise be lost
    report = evaluate(
        args.model, args.benchmark, samples=args.samples, num_examples=args.num_examples,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, greedy=args.greedy,
        batch_size=args.batch_size, seed=args.seed, label=args.label, device=args.device, backend=args.backend,
        cache_implementation=args.cache_implementation,
    )
    if args.output:
        report.save(args.output)
        print(f"report: {args.output}")
    print(markdown_table([report]))
    by_task = report.pass_at_1_by_task()
    if len(by_task) > 1:
        print("per task: " + ", ".join(f"{task} {100 * value:.1f}" for task, value in by_task.items()))
    return 0


def _compare(args: argparse.Namespace) -> int:
    reports = []
    for path in args.reports:
        try:
            reports.append(EvalReport.load(path))
        except (OSError, ValueError, TypeError) as exc:
            raise RqatError(f"{path} is not an evaluation report written by `rqat eval -o`: {exc}") from None
    print(markdown_table(reports, baseline=args.baseline))
    if args.plot:
        plot(reports, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _serve_check(args: argparse.Namespace) -> int:
    if args.setup:
        print(f"vLLM environment: {vllm_env.create()}")
        return 0
    if args.checkpoint is None:
        raise RqatError("serve-check needs a checkpoint directory (or --setup)")
    report = serve_check(args.checkpoint, max_tokens=args.max_tokens, interpreter=args.python)
    if args.output:
        write_json_atomic(args.output, report.to_dict())
    if report.skipped:
        print(f"skipped: {report.skipped}")
        return 0
    print(f"{report.checkpoint} ({report.scheme}) on {report.target}: {report.identical:.0%} of {report.prompts} "
          f"prompts identical for {report.max_tokens} greedy tokens "
          f"(mean common prefix {report.mean_common_prefix:.1f})")
    print(f"tokens/s: transformers {report.transformers_tokens_per_s:.1f}, vLLM {report.vllm_tokens_per_s:.1f} "
          f"(vLLM load {report.vllm_load_seconds:.0f} s)")
    return 1 if args.require_identical and report.identical < 1.0 else 0


def _recipes(args: argparse.Namespace) -> int:
    recipes = {name: Recipe.from_file(path) for name, path in bundled().items()}
    width = max(map(len, recipes), default=0)
    for name, recipe in recipes.items():
        print(f"{name:<{width}}  {recipe.scheme.label:<8} {recipe.description or ''}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    check_output_dir(args.output_dir, EMBEDDED, overwrite=True)  # before the evaluation, not after it
    started = time.perf_counter()
    common = dict(greedy=True, num_examples=args.problems, max_new_tokens=96, dtype="float32")
    parameters = json.loads((EMBEDDED / "testbed.json").read_text())["parameters"]
    print(f"Reasoning-QAT demo on the embedded testbed ({EMBEDDED.name}, a {parameters / 1e6:.2f}M-parameter Qwen3 "
          "trained offline)")
    print(f"1/4 evaluating the full-precision model on {args.problems} held-out testbed problems ...")
    teacher = evaluate(EMBEDDED, "testbed", label="full precision", **common)
    print("2/4 running the recipe: PTQ, then quantization-aware distillation ...")
    result = oneshot(EMBEDDED, recipe=args.recipe, output_dir=args.output_dir, overwrite=True, keep_checkpoints="all",
                     dtype="float32")
    first = sorted((args.output_dir / CHECKPOINTS).iterdir())[0]
    print(f"3/4 evaluating the PTQ model ({first.name}) ...")
    ptq = evaluate(first, "testbed", label=f"PTQ ({result.recipe.scheme.label})", **common)
    label = f"Reasoning-QAT ({result.recipe.scheme.label})"
    if _exported_evaluation_matches(result.recipe, common):
        print("4/4 the exported Reasoning-QAT checkpoint: evaluated by the recipe's export, whose reload check "
              "found the checkpoint's logits identical")
        final = replace(EvalReport.load(args.output_dir / EVALUATION_FILE), label=label)
    else:
        print("4/4 evaluating the exported Reasoning-QAT checkpoint ...")
        final = evaluate(args.output_dir, "testbed", label=label, **common)
    print()
    print(markdown_table([teacher, ptq, final], baseline="full precision"))
    plot([teacher, ptq, final], args.output_dir / "demo.png", title="testbed: greedy pass@1")
    elapsed = time.perf_counter() - started
    print(f"\ncheckpoint: {args.output_dir} (plot: {args.output_dir / 'demo.png'}); {elapsed:.0f} s")
    return 0


def _exported_evaluation_matches(recipe: Recipe, demo: dict[str, Any]) -> bool:
    """Whether the recipe's export already evaluated the checkpoint as the demo would (greedy decoding makes
    the seed irrelevant), so that the demo need not generate the same 150 answers a second time."""
    config = recipe.export.evaluate
    return (config is not None and config.benchmark == "testbed" and config.greedy
            and config.num_examples == demo["num_examples"] and config.max_new_tokens == demo["max_new_tokens"])


if __name__ == "__main__":
    sys.exit(main())

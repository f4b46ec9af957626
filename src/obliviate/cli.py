"""The `obliviate` command line. Heavy libraries are imported inside the commands, so --help and `ls` are instant."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from obliviate.errors import ObliviateError
from obliviate.memory import return_freed_memory

return_freed_memory()  # the command line's runs give freed tensor memory back to the system (memory.py)
HELP = {"help_option_names": ["-h", "--help"]}
# typer's completion options: --install-completion / --show-completion (bash, zsh, fish, PowerShell)
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, context_settings=HELP,
                  help="Machine unlearning for generative models, with honest evidence.")
world_app = typer.Typer(no_args_is_help=True, context_settings=HELP, help="Build the built-in worlds.")
app.add_typer(world_app, name="world")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"obliviate {version('obliviate')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from obliviate import __version__
            typer.echo(f"obliviate {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Machine unlearning for generative models, with honest evidence."""


def _fail(e: Exception) -> None:
    """The one line of an error, exit code 2. Under several processes (torchrun, accelerate launch) every process
    meets the same bad input: the first prints the line; the others wait for the launcher, which ends them as soon as
    the first exits, and print it themselves only if it does not (the first process did not fail)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        import time

        time.sleep(FAILURE_WAIT_S)
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


FAILURE_WAIT_S = 20.0  # how long the other processes leave the first one to print a shared error


def _quiet(flag: bool) -> None:
    from obliviate import progress
    progress.set_enabled(not flag)


def _kinds() -> list[str]:
    from obliviate.registry import KINDS
    return [*KINDS, "all"]


@app.command("ls")
def ls(kind: str = typer.Argument("all", help="methods | t2i-methods | mllm-methods | metrics | attacks | worlds | "
                                              "all", autocompletion=_kinds)):
    """List registered methods, metrics, attacks and worlds, one line each with the paper; `ls attacks` also lists
    each attack's options with their defaults (`obliviate attack RUN -a NAME key=value`)."""
    from obliviate.registry import KINDS, METHODS, RETRAIN, WORLD_RECIPES

    kinds = list(KINDS) if kind == "all" else [kind]
    for k in kinds:
        if k not in KINDS:
            _fail(ObliviateError(f"unknown kind '{k}'. Valid: {', '.join(KINDS)}, all"))
        typer.echo(f"{k}:")
        for e in KINDS[k].values():
            name = f"{e.name} (guard)" if e.guard else e.name
            typer.echo(f"  {name:<22} {e.description}" + (f"  [{e.paper}]" if e.paper else ""))
            if kind == "attacks":  # asked for alone: worth importing the attacks (torch) for their options
                typer.echo(_attack_options(e))
        if any(KINDS[k] is table for table in METHODS.values()):  # what a run's `method` may name besides them
            typer.echo(f"  {RETRAIN.name + ' (reference)':<22} {RETRAIN.description}  [{RETRAIN.paper}]")
            for family, table in METHODS.items():
                for e in WORLD_RECIPES.get(family, {}).values() if KINDS[k] is table else ():
                    typer.echo(f"  {e.name + ' (world recipe)':<22} {e.description}  [{e.paper}]")
    if kind == "all":
        typer.echo("(each attack's options: obliviate ls attacks)")


def _attack_options(entry) -> str:
    """An attack's Config fields as `key=default`, wrapped under its line."""
    import dataclasses
    import textwrap

    def default(f):
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"

    options = [f"{f.name}={default(f)!r}" if isinstance(default(f), str) else f"{f.name}={default(f)}"
               for f in dataclasses.fields(entry.load().Config) if not f.name.startswith("_")]
    return textwrap.fill("  ".join(options) or "(no options)", width=110, initial_indent=" " * 27,
                         subsequent_indent=" " * 27, break_long_words=False, break_on_hyphens=False)


@app.command()
def validate(config: Path, overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides")):
    """Check a run config without running it: its keys and values, and everything `run` would reject before
    training (the model folder, data and prompt files, the split or concept, an existing run folder)."""
    from obliviate.config import load_config

    try:
        from obliviate.families import get
        from obliviate.runners.common import method_of
        from obliviate.runs import resolve_device
        from obliviate.tracking import check as check_report_to

        cfg = load_config(config, overrides or [])
        family = get(cfg.family)
        check_report_to(cfg)  # train.report_to names a package that is installed
        method_of(cfg)  # the method and its method_args (or the retrain reference's seed)
        family.load("check")(cfg)  # the model folder, data files, split or concept, run folder: what `run` rejects
        resolve_device(cfg.device)  # a CUDA device on a machine without one
    except ObliviateError as e:
        _fail(e)
    typer.echo(f"ok: {config} ({family.title} run, method {cfg.method}, {family.describe(cfg)})")


@app.command()
def run(config: Path, overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
        quiet: bool = typer.Option(False, help="no progress bars"),
        resume: bool = typer.Option(False, help="continue an interrupted run from its last checkpoint "
                                                "(train.checkpoint_every)")):
    """Unlearn with a config file (TOML/YAML), evaluate, and write a run folder."""
    _quiet(quiet)
    try:
        from obliviate.config import load_config
        from obliviate.runners import run as run_config
        run_config(load_config(config, overrides or []), resume=resume)
    except ObliviateError as e:
        _fail(e)


@app.command("eval")
def evaluate(model: Path = typer.Argument(..., help="a transformers model folder"),
             forget_file: Optional[Path] = typer.Option(None, help="TOFU-format JSON lines to score as forget set"),
             retain_file: Optional[Path] = typer.Option(None, help="TOFU-format JSON lines to score as retain set"),
             tofu_dir: Optional[Path] = typer.Option(None, help="TOFU's release folder (forget10_perturbed.json, ...)"),
             muse_dir: Optional[Path] = typer.Option(None, help="a MUSE corpus folder (raw/, verbmem/, knowmem/, "
                                                                "privleak/)"),
             eval_set: Optional[List[str]] = typer.Option(None, help="FILE or FILE:ROLE, another set to score "
                                                                     "(roles: forget, retain, utility, "
                                                                     "utility_normalised, holdout); repeatable"),
             retrain_model: Optional[Path] = typer.Option(None, help="a model never trained on the forget set: "
                                                                     "forget quality and PrivLeak"),
             retrain_eval: Optional[Path] = typer.Option(None, help="that model's evaluation (an earlier eval.json, "
                                                                    "TOFU's eval_log_forget.json or "
                                                                    "OpenUnlearning's TOFU_EVAL.json)"),
             mllmu_dir: Optional[Path] = typer.Option(None, help="MLLMU-Bench's release folder, for a vision-language "
                                                                 "model folder"),
             wmdp_dir: Optional[Path] = typer.Option(None, help="cais/wmdp as downloaded (wmdp-bio/test-*.parquet, "
                                                                "...): lm-evaluation-harness's WMDP tasks"),
             mmlu_dir: Optional[Path] = typer.Option(None, help="cais/mmlu as downloaded (<subject>/test-*.parquet): "
                                                                "lm-evaluation-harness's MMLU tasks"),
             harness_task: Optional[List[str]] = typer.Option(None, help="with --wmdp-dir/--mmlu-dir: a task or group "
                                                                         "to run (default: wmdp and mmlu); "
                                                                         "repeatable"),
             num_fewshot: Optional[int] = typer.Option(None, help="with --wmdp-dir/--mmlu-dir: few-shot examples "
                                                                  "(default: the tasks' own, 0)"),
             harness_limit: Optional[int] = typer.Option(None, help="with --wmdp-dir/--mmlu-dir: the first N "
                                                                    "questions of each task (a quick look)"),
             world: Optional[str] = typer.Option(None, help="the built-in world to score on: profiles (default) or "
                                                            "portraits (a vision-language model)"),
             split: str = typer.Option("forget10", help="the split: of TOFU's release, or of the built-in world"),
             world_tofu_dir: Optional[Path] = typer.Option(None, help="the built-in world with TOFU's utility files"),
             template: str = typer.Option("auto", help="prompt format: auto, chat, qa, llama2, llama3, chatml, "
                                                       "zephyr, phi3, custom"),
             tag: Optional[List[str]] = typer.Option(None, help="KEY=VALUE, a tag of a custom or named template "
                                                               "(system_start, system_end, user_start, user_end, "
                                                               "assistant_start, assistant_end; \\n is a newline); "
                                                               "repeatable"),
             system_prompt: Optional[str] = typer.Option(None, help="a system prompt for the chat template"),
             retain_people: Optional[int] = typer.Option(None, help="score the first N retain people (default: a "
                                                                    "world's 40, all of a benchmark's files)"),
             batch_size: int = typer.Option(32, help="items per batch"),
             max_logit_tokens: int = typer.Option(4096, help="tokens of full-vocabulary logits per forward pass "
                                                             "(bounds memory)"),
             device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps"),
             dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
             trust_remote_code: bool = typer.Option(False, help="run the model folder's own Python code"),
             out: Path = typer.Option(Path("eval.json"), help="where to write the evaluation JSON"),
             force: bool = typer.Option(False, "--force", help="overwrite --out if it exists"),
             quiet: bool = typer.Option(False, help="no progress bars")):
    """Evaluate a model folder on your files or a benchmark's (compared with a retrain reference when given), or
    on the built-in world's sets (compared with its retrain model); --wmdp-dir / --mmlu-dir add
    lm-evaluation-harness's WMDP and MMLU tasks on those files (alone: only them)."""
    _quiet(quiet)
    try:
        from obliviate.api import evaluate_folder
        from obliviate.benchmark_files import ROLES

        sets = []
        for spec in eval_set or []:  # FILE or FILE:ROLE
            path, _, role = spec.rpartition(":")
            sets.append({"file": path, "role": role} if role in ROLES else {"file": spec, "role": None})
        tags = {}
        for spec in tag or []:  # KEY=VALUE, checked as a config's [template] table is
            if "=" not in spec:
                raise ObliviateError(f"--tag {spec!r} must look like KEY=VALUE (e.g. user_start='USER: ')")
            key, value = spec.split("=", 1)
            tags[key.strip()] = value.replace("\\n", "\n")
        harness = {k: v for k, v in {"wmdp_dir": wmdp_dir and str(wmdp_dir), "mmlu_dir": mmlu_dir and str(mmlu_dir),
                                     "tasks": harness_task or None, "num_fewshot": num_fewshot,
                                     "limit": harness_limit}.items() if v is not None}
        result = evaluate_folder(
            model, out, force=force, split=split, world_tofu_dir=world_tofu_dir, forget_file=forget_file,
            retain_file=retain_file, tofu_dir=tofu_dir, muse_dir=muse_dir, eval_sets=sets, mllmu_dir=mllmu_dir,
            world=world, harness=harness or None,
            retrain_model=retrain_model, retrain_eval=retrain_eval, template={"name": template, **tags},
            system_prompt=system_prompt, retain_people=retain_people,
            batch_size=batch_size, max_logit_tokens=max_logit_tokens, device=device, dtype=dtype,
            trust_remote_code=trust_remote_code or None)
    except ObliviateError as e:
        _fail(e)
    from obliviate.bench.scorecard import print_scorecard
    print_scorecard({model.name: result["aggregate"]})
    typer.echo(f"wrote {out}")


@app.command()
def bench(spec: Path = typer.Argument(..., help="a bench spec (TOML or YAML; docs/bench.md)"),
          overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides of the spec's base config"),
          out: Optional[Path] = typer.Option(None, help="the bench folder (default: runs/bench-NAME)"),
          workers: int = typer.Option(1, help="cells run side by side in this many local processes"),
          ray: bool = typer.Option(False, "--ray", help="run the cells as Ray tasks (a local Ray instance unless "
                                                       "--ray-address)"),
          ray_address: Optional[str] = typer.Option(None, help="join this Ray cluster (implies --ray)"),
          threads: Optional[int] = typer.Option(None, help="torch threads per cell (default: cores // workers); "
                                                             "a cell's numbers depend on it, so keep it when comparing"),
          retry_failed: bool = typer.Option(False, "--retry-failed", help="run failed cells again"),
          dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and which are done; run nothing"),
          quiet: bool = typer.Option(False, help="no progress bars")):
    """Compare methods: a validation grid, settings chosen per method by the spec's rule, the chosen settings on
    the reported target over seeds, the retrain noise floor, scalability and sustainability; a leaderboard.
    Resumable: run it again to go on where it stopped."""
    _quiet(quiet)
    try:
        from obliviate.api import bench as run_bench
        run_bench(spec, out, workers=workers, use_ray=ray or ray_address is not None, ray_address=ray_address,
                  threads=threads, retry_failed=retry_failed, dry_run=dry_run, overrides=overrides or [], log=typer.echo)
    except ObliviateError as e:
        _fail(e)


@world_app.command("build")
def world_build(name: str = typer.Argument("profiles"),
                split: Optional[str] = typer.Option(None, help="the target whose retrain reference to build: a split "
                                                         "(profiles, portraits; default forget10) or a canvas "
                                                         "concept (default: striped and star)"),
                tofu_dir: Optional[Path] = typer.Option(None, help="add TOFU's real utility files from this folder"),
                n_people: Optional[int] = typer.Option(None, help="people of the world (default: the world's own: "
                                                               "profiles 200, portraits 24)"),
                seed: int = typer.Option(0),
                arch: str = typer.Option("dense", help="profiles: 'moe' builds the mixture-of-experts variant "
                                                       "(docs/moe.md)"),
                quiet: bool = typer.Option(False, help="no progress bars")):
    """Generate a world and train its full and retrain models (cached by recipe hash)."""
    _quiet(quiet)
    try:
        from obliviate.config import WorldConfig
        from obliviate.families import family_of_world, require_extra
        from obliviate.registry import WORLDS, lookup
        from obliviate.worlds import build_world
        entry = lookup(WORLDS, name, "world")
        family = family_of_world(entry.name)
        require_extra(family.extra, *family.needs)
        sizes = {"n_people": n_people} if n_people else {}
        extra = {"tofu_dir": str(tofu_dir)} if tofu_dir else {}
        if arch != "dense":
            from obliviate.worlds import ARCH_RECIPES

            variants = ["dense"] + [a for (w, a) in ARCH_RECIPES if w == entry.name]
            if arch not in variants:
                raise ObliviateError(f"--arch {arch!r}: the {entry.name} world is built as "
                                     + " or ".join(repr(v) for v in variants))
            extra["arch"] = arch
        world = build_world(WorldConfig(name=entry.name, seed=seed, **sizes, **extra), split)
    except ObliviateError as e:
        _fail(e)
    typer.echo(f"world ready: {world.root}")


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="output folder"),
         tofu_dir: Optional[Path] = typer.Option(None, help="folder with TOFU's world_facts/real_authors files"),
         methods: str = typer.Option("GradDiff,NPO,SimNPO,RG,RGD", help="comma-separated language-model methods"),
         t2i_methods: str = typer.Option("ESD-x,UCE,RGD,AdvUnlearn", help="comma-separated text-to-image methods"),
         concepts: str = typer.Option("striped,star", help="canvas concepts to erase (a style and an object)"),
         mllm_methods: str = typer.Option("GradDiff,NPO,SimNPO,RGD,MMUnlearner,PromptDecouple",
                                          help="comma-separated vision-language methods (the portraits world)"),
         worlds: str = typer.Option("", help="which parts to run: any of profiles, canvas and portraits (default: "
                                             "all three)"),
         jobs: int = typer.Option(min(2, os.cpu_count() or 1), help="parts run side by side, one process each "
                                                                     "(1: one after the other, in this process)"),
         full_size: bool = typer.Option(False, help="the full-size worlds and sampling settings (200 people, 2 "
                                                    "seeds and 25 DDIM steps per image) instead of the demo's smaller "
                                                    "ones: several times longer"),
         quiet: bool = typer.Option(False, help="no progress bars")):
    """Build the worlds; unlearn forget10 of the profiles world, erase a style and an object from the canvas pipeline
    and unlearn forget10 of the portraits world's LLaVA with several methods; score them against the retrain
    references; write a report."""
    _quiet(quiet)

    def split(text: str) -> list[str]:
        return [m.strip() for m in text.split(",") if m.strip()]
    try:
        from obliviate.demo import run_demo
        run_demo(out, tofu_dir, split(methods), t2i_methods=split(t2i_methods), concepts=split(concepts),
                 worlds=tuple(split(worlds)) or None, jobs=jobs, size="full" if full_size else "demo",
                 mllm_methods=split(mllm_methods))
    except ObliviateError as e:
        _fail(e)


@app.command()
def export(run_dir: Path, out: Path, base: Optional[Path] = typer.Option(None, help="base model folder (default: "
                                                                         "the one recorded in the run)"),
           push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="USER/NAME",
                                                     help="upload the exported folder to this Hugging Face Hub "
                                                          "repository (huggingface_hub's token: HF_TOKEN or "
                                                          "`huggingface-cli login`)"),
           private: bool = typer.Option(False, "--private", help="with --push-to-hub: a new repository is private")):
    """Write a full model folder (transformers, or a diffusers pipeline): the run's base model with its changed
    tensors applied, and a model card (README.md) recording the base, what was forgotten, the method and settings
    and the headline metrics."""
    try:
        from obliviate.api import export_run
        export_run(run_dir, out, base, push_to_hub=push_to_hub, private=private)
    except ObliviateError as e:
        _fail(e)
    typer.echo(f"wrote {out}" + (f" and pushed it to https://huggingface.co/{push_to_hub}" if push_to_hub else ""))
    from obliviate.guards import GUARD_FILE, LOAD_CALL
    if (out / GUARD_FILE).is_file():  # from_pretrained alone would give the unguarded model
        pipeline = (out / "model_index.json").is_file()
        typer.echo(f"a generation-time guard ({GUARD_FILE}): sample through it with {LOAD_CALL}({str(out)!r}); " +
                   ("diffusers' from_pretrained alone loads the unguarded pipeline" if pipeline else
                    "transformers' from_pretrained alone loads the unguarded model"))


@app.command()
def attack(run_dir: Path = typer.Argument(..., help="a run folder (language model, text-to-image or vision-language)"),
           options: Optional[List[str]] = typer.Argument(None, help="attack options: key=value (every attack that "
                                                         "has the key) or attack.key=value"),
           names: Optional[List[str]] = typer.Option(None, "--attack", "-a", help="an attack (`obliviate ls "
                                                     "attacks`); repeat for several; default: the family's set"),
           detector: Optional[Path] = typer.Option(None, help="text-to-image: a CLIP folder (zero-shot) or an "
                                                   "image-classifier folder that judges whether the concept is drawn"),
           detector_label: Optional[str] = typer.Option(None, help="the classifier's label (or CLIP's prompt) that "
                                                        "means the concept"),
           quiet: bool = typer.Option(False, help="no progress bars")):
    """Recovery attacks on an unlearned model: does the forgotten thing come back? Each attack also runs on the
    original model and the retrain reference; each writes RUN_DIR/attacks/NAME.json."""
    _quiet(quiet)
    try:
        from obliviate.api import attack_run
        from obliviate.config import parse_value

        pairs = {}
        for item in options or []:
            if "=" not in item:
                raise ObliviateError(f"attack option '{item}' must look like key=value or attack.key=value")
            key, value = item.split("=", 1)
            pairs[key.strip()] = parse_value(value)
        inputs = {k: v for k, v in (("detector", detector), ("detector_label", detector_label)) if v is not None}
        results = attack_run(run_dir, names or None, pairs, log=typer.echo, **inputs)
    except ObliviateError as e:
        _fail(e)
    from obliviate.bench.scorecard import print_attack

    for name, result in results.items():
        print_attack(name, result)
        typer.echo(f"wrote {Path(run_dir) / 'attacks' / (name + '.json')}")


@app.command()
def report(folders: List[Path] = typer.Argument(..., help="Run, demo or bench folders."),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="The comparison page, for several folders "
                                              "(default: ./obliviate-report.html)."),
           figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw the plots (bench and comparison "
                                        "pages; without them, the tables in seconds).")):
    """(Re)write the HTML report of a run, demo or bench folder (a bench's leaderboard); with several run or bench
    folders, one page that compares them side by side."""
    try:
        from obliviate.api import report_folders
        paths = report_folders(folders, out, figures)
    except ObliviateError as e:
        _fail(e)
    for path in paths:
        typer.echo(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

"""A new concept by LoRA: adapters teach a text-to-image base what its training data never showed.

What is held out is ``--concept`` (``config.data.heldout``): "pairs", the (shape, colour) pairs
HELDOUT_PAIRS of ``diffusion_jax/data/captions.py`` (every shape and colour is still seen with
other partners), or a colour or a shape the base never sees at all (a held-out colour is not even
named as a background).

The protocol, each step with the library's own entry points:

1. train a text-to-image base on captioned shapes of split "train" (``data.split="train"``: the
   held-out concept never appears);
2. train the attribute judge (``prompt_eval.train_attribute_classifier``, what
   ``--mode=train_classifier`` runs) into ``WORKDIR/classifier``, which both evaluations read
   (``config.evaluation.classifier_dir``);
3. measure the base's prompt adherence (``prompt_eval.evaluate_prompts``: seen and held-out
   pairs, the same prompts and noise for every run);
4. train LoRA adapters on the base (``config.lora.rank``, ``config.lora.base``) on split
   ``--lora-split``: "heldout" (the concept alone, the default) or "all" (the concept among
   everything the base saw, so that the adapter must keep the rest);
5. measure the adapted run's prompt adherence the same way;
6. with ``--inpaint N``, inpainting adherence of both runs (``inpaint_eval.evaluate_inpainting``
   on N one-object test images: the requested object with and without the prompt);
7. print one table: held-out and seen adherence before and after, the adapters' parameters and
   bytes against the base's (the leaves of the restored LoRA run's ``state.params`` against
   ``state.frozen``), and the adapter run's training steps/s against the base's (the median
   of the rates the training loop logs).

    python benchmarks/lora_concept.py              # CPU preset, in benchmarks/results/lora_concept
    python benchmarks/lora_concept.py --concept yellow --set data.resolution=16 \\
        --set data.max_objects=1 --set data.batch_size=32 --set sampling.num_steps=20 \\
        --base-steps 3000 --lora-steps 600 --inpaint 200       # docs/editing.md's CPU numbers
    python benchmarks/lora_concept.py --preset configs/text_shapes.py --base-steps 5000 \\
        --lora-steps 1000 --rank 8 --workdir runs/lora_concept_gpu
    python benchmarks/lora_concept.py --tiny --workdir /tmp/lora_concept    # a smoke test

A base run, judge or adapter run already complete in WORKDIR is reused (its steps/s is then not
measured again). ``--set KEY=VALUE`` overrides any config key of both runs (e.g.
``--set sampling.num_steps=30``). The results go to ``WORKDIR/lora_concept.json`` (``lora_concept_all.json`` with
``--lora-split all``) and stdout.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import configuration, files, inpaint_eval, prompt_eval, run, train  # noqa: E402
from diffusion_jax.data import captions  # noqa: E402

DEFAULT_PRESET = os.path.join(ROOT, "configs", "text_shapes_cpu.py")
_RATE = re.compile(r"([0-9.]+) steps/s")
_FIRST = re.compile(r"([0-9.eE+-]+) s/step")


def shrink(config):
    """The preset at smoke-test size: 16x16 images, an 8-channel UNet, a 1-block text encoder."""
    config.data.update(resolution=16, batch_size=8, size=256, worker_count=0)
    config.model.unet.update(channels=8, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions=(8,), num_heads=1, head_dim=0)
    config.model.dtype = "float32"
    config.text.update(width=32, depth=1, num_heads=2, max_length=80)
    config.training.update(warmup_steps=0, log_every=1)
    config.classifier.update(batch_size=16)
    config.evaluation.batch_size = 8
    config.sampling.num_steps = 3
    return config


def _override(config, assignment: str):
    key, _, text = assignment.partition("=")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string
    *groups, name = key.strip().split(".")
    node = config
    for group in groups:
        node = node[group]
    if name not in node:
        raise SystemExit(f"--set {assignment}: {key} is not a config key")
    node[name] = value


def make_configs(args):
    """``(base config, adapter config)`` of the protocol, from the preset and the arguments."""
    config = configuration.load_config(args.preset)
    if args.tiny:
        config = shrink(config)
    for assignment in args.set:
        _override(config, assignment)
    if config.data.name != "captions":
        raise SystemExit(f"--preset {args.preset} trains on {config.data.name!r}; the protocol "
                         "needs captioned shapes (data.name='captions')")
    t = config.training
    config.training.sample_every = 0  # nothing but training steps in the timed loop
    config.evaluation.classifier_dir = os.path.join(os.path.abspath(args.workdir), "classifier")
    config.evaluation.num_samples = args.num_prompts
    config.evaluation.batch_size = min(config.evaluation.batch_size, args.num_prompts)
    config.evaluation.guidance_scales = tuple(args.guidance_scales)
    if args.classifier_steps:
        config.classifier.num_steps = args.classifier_steps
    if args.concept is not None:
        config.data.heldout = args.concept
    base, adapter = config, config.copy_and_resolve_references()
    base.data.split = "train"
    base.training.update(num_steps=args.base_steps or t.num_steps,
                         checkpoint_every=args.base_steps or t.num_steps)
    adapter.data.split = args.lora_split
    adapter.lora.update(rank=args.rank, base=os.path.join(os.path.abspath(args.workdir), "base"))
    lora_steps = args.lora_steps
    adapter.training.update(num_steps=lora_steps, checkpoint_every=lora_steps,
                            warmup_steps=min(t.warmup_steps, lora_steps // 10),
                            log_every=min(t.log_every, max(lora_steps // 5, 1)))
    if args.lora_learning_rate:
        adapter.training.learning_rate = args.lora_learning_rate
    return base, adapter


def train_timed(config, workdir: str) -> dict:
    """Train (or finish) the run in ``workdir``; its steps and the steps/s the loop logged."""
    lines = []

    def log(line):
        lines.append(line)
        print(f"  [{os.path.basename(workdir)}] {line}", flush=True)

    start = time.time()
    state = train.train_and_evaluate(config, workdir, log=log)
    rates = [float(m.group(1)) for line in lines for m in [_RATE.search(line)] if m]
    first = [float(m.group(1)) for line in lines if "compiled the train step" in line
             for m in [_FIRST.search(line)] if m]
    steps_per_s = (statistics.median(rates) if rates
                   else 1.0 / first[0] if first and first[0] > 0 else None)
    return {"steps": int(state.step), "steps_per_s": steps_per_s, "logged_rates": rates,
            "seconds": round(time.time() - start, 1)}


def _size(tree) -> dict:
    leaves = jax.tree_util.tree_leaves(tree)
    return {"params": int(sum(x.size for x in leaves)),
            "bytes": int(sum(x.size * np.dtype(x.dtype).itemsize for x in leaves))}


def adapter_size(config, workdir: str) -> dict:
    """The adapters' and the frozen base's parameter counts and bytes in the restored LoRA run."""
    state = run.restore_run(config, workdir)[0]
    return {"adapter": _size(state.params), "base": _size(state.frozen)}


def adherence(results: dict) -> list:
    """Per guidance scale, the seen and held-out mean accuracy, all-correct, shape and colour."""
    rows = []
    for scale in results["scales"]:
        row = {"guidance_scale": scale["guidance_scale"]}
        for group in ("seen", "heldout"):
            r = scale[group]
            row[group] = {"mean_accuracy": r["mean_accuracy"], "all_correct": r["all_correct"],
                          "shape": r["accuracy"]["shape"], "colour": r["accuracy"]["colour"]}
            if "concept_rate" in scale:  # images showing the held-out colour or shape
                row[group]["concept_rate"] = scale["concept_rate"][group]
        rows.append(row)
    return rows


def _inpainting_summary(results: dict) -> dict:
    """What the protocol keeps of an inpainting evaluation: its table, rates and exactness."""
    keep = ("num", "mask_fraction", "unedited", "without_prompt", "with_prompt", "kept_region",
            "path")
    return {**{k: results[k] for k in keep if k in results},
            "table": inpaint_eval.format_table(results)}


def table(result: dict) -> str:
    """The one markdown table of the protocol's results."""
    def num(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    def change(before, after):
        return "-" if before is None or after is None else f"{after - before:+.3f}"

    lines = ["| quantity | base | base + LoRA | change |", "| --- | ---: | ---: | ---: |"]
    for before, after in zip(result["base"]["adherence"], result["lora"]["adherence"]):
        g = f"{before['guidance_scale']:g}"
        held = ("held-out" if result.get("concept", "pairs") == "pairs"
                else f"held-out ({result['concept']})")
        for group, label in (("heldout", held), ("seen", "seen")):
            keys = [("mean_accuracy", "mean accuracy"), ("all_correct", "all correct"),
                    ("shape", "shape"), ("colour", "colour")]
            if "concept_rate" in before[group]:
                keys.append(("concept_rate", f"images showing {result['concept']}"))
            for key, name in keys:
                b, a = before[group][key], after[group][key]
                lines.append(f"| {label} {name}, guidance {g} | {num(b)} | {num(a)} | "
                             f"{change(b, a)} |")
    size = result["lora"]["size"]
    for key, name in (("params", "parameters trained (base: all; LoRA: adapters)"),
                      ("bytes", "bytes of them")):
        b, a = size["base"][key], size["adapter"][key]
        lines.append(f"| {name} | {b:,} | {a:,} | {a / b:.2%} of the base |")
    b, a = result["base"]["train"]["steps_per_s"], result["lora"]["train"]["steps_per_s"]
    ratio = "-" if not (a and b) else f"x{a / b:.2f}"
    lines.append(f"| train steps/s | {num(b, 2)} | {num(a, 2)} | {ratio} |")
    lines.append(f"| train steps (split) | {result['base']['train']['steps']} (train) | "
                 f"{result['lora']['train']['steps']} ({result['lora']['split']}) | |")
    return "\n".join(lines)


def main(argv=None):
    """Run the protocol and print and save its results."""
    args = parse_args(argv)
    base_config, lora_config = make_configs(args)
    suffix = "" if args.lora_split == "heldout" else f"_{args.lora_split}"
    base_dir, lora_dir = (os.path.join(os.path.abspath(args.workdir), name)
                          for name in ("base", f"lora_rank{args.rank}{suffix}"))
    for workdir in (base_dir, lora_dir):  # a finished run is reused: it must hold out the same
        saved = os.path.join(workdir, "config.json")
        if os.path.isfile(saved):
            with open(saved) as f:
                held = json.load(f).get("data", {}).get("heldout", "pairs")
            if held != base_config.data.heldout:
                raise SystemExit(f"{workdir} trained with data.heldout={held!r}, this protocol "
                                 f"holds out {base_config.data.heldout!r}: choose another "
                                 "--workdir")
    print(f"1. base on split 'train' in {base_dir}", flush=True)
    base_train = train_timed(base_config, base_dir)
    classifier = os.path.join(base_config.evaluation.classifier_dir, "classifier.json")
    print(f"2. attribute classifier in {os.path.dirname(classifier)}", flush=True)
    if os.path.isfile(classifier):
        with open(classifier) as f:
            judge = json.load(f)
        print("   (reused)")
    else:
        judge = prompt_eval.train_attribute_classifier(base_config, base_dir)
    print("3. prompt adherence of the base", flush=True)
    base_eval = prompt_eval.evaluate_prompts(base_config, base_dir)
    print(f"4. LoRA rank {args.rank} on split {args.lora_split!r} in {lora_dir}", flush=True)
    lora_train = train_timed(lora_config, lora_dir)
    print("5. prompt adherence of the base + LoRA", flush=True)
    lora_eval = prompt_eval.evaluate_prompts(lora_config, lora_dir)
    inpainting = {}
    if args.inpaint:
        for name, config, workdir in (("base", base_config, base_dir),
                                      ("lora", lora_config, lora_dir)):
            print(f"6. inpainting adherence of the {name}", flush=True)
            inpainting[name] = _inpainting_summary(inpaint_eval.evaluate_inpainting(
                config, workdir, num=args.inpaint))
    result = {
        "preset": os.path.relpath(os.path.abspath(args.preset), ROOT), "tiny": args.tiny,
        "device": jax.devices()[0].device_kind, "num_prompts": args.num_prompts,
        "concept": base_config.data.heldout, "heldout_pairs": base_eval["heldout_pairs"],
        "classifier": {"dir": base_config.evaluation.classifier_dir,
                       "test_accuracy": judge["test_accuracy"]},
        "base": {"workdir": base_dir, "train": base_train, "adherence": adherence(base_eval)},
        "lora": {"workdir": lora_dir, "rank": args.rank, "targets": lora_config.lora.targets,
                 "split": args.lora_split,
                 "train": lora_train, "adherence": adherence(lora_eval),
                 "size": adapter_size(lora_config, lora_dir)},
        "overrides": list(args.set),
    }
    for name, summary in inpainting.items():
        result[name]["inpainting"] = summary
    result["table"] = table(result)
    path = os.path.join(os.path.abspath(args.workdir), f"lora_concept{suffix}.json")
    files.save_json(path, result)
    print(result["table"])
    for name, summary in inpainting.items():
        print(f"\n{name}: {summary['table']}")
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))
    print(f"wrote {path}")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="config file of the base run")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "benchmarks", "results",
                                                          "lora_concept"),
                        help="where the runs, the judge and lora_concept.json go")
    parser.add_argument("--base-steps", type=int, default=None,
                        help="training steps of the base (default: the preset's)")
    parser.add_argument("--lora-steps", type=int, default=None,
                        help="training steps of the adapters (default 500)")
    parser.add_argument("--concept", default=None, choices=captions.HELDOUT_CHOICES,
                        help="what the base never sees (config.data.heldout): 'pairs', a "
                             "colour or a shape (default: the preset's, 'pairs')")
    parser.add_argument("--lora-split", default="heldout", choices=("heldout", "all"),
                        help="the adapters' training data: the concept alone, or everything")
    parser.add_argument("--rank", type=int, default=8, help="config.lora.rank")
    parser.add_argument("--lora-learning-rate", type=float, default=None,
                        help="the adapter run's learning rate (default: the preset's)")
    parser.add_argument("--classifier-steps", type=int, default=None,
                        help="the judge's training steps (default: the preset's)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="prompts per guidance scale, half of them held-out pairs "
                             "(default 200)")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--inpaint", type=int, default=0, metavar="N",
                        help="also measure inpainting adherence of both runs on N one-object "
                             "test images (0: skip)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of both runs (repeatable)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: the preset shrunk to 16x16 and an 8-channel UNet, "
                             "4 base steps, 2 adapter steps, a 4-step judge, 8 prompts")
    return parser


def parse_args(argv=None):
    """The arguments, with the defaults of a full run or, with ``--tiny``, of the smoke test."""
    args = build_parser().parse_args(argv)
    sizes = ({"base_steps": 4, "lora_steps": 2, "classifier_steps": 4, "num_prompts": 8}
             if args.tiny else {"lora_steps": 500, "num_prompts": 200})
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


if __name__ == "__main__":
    main()

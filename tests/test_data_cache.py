"""tftransfer.data.cache: data.cache auto / memory / disk / false."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import TINY_DIGITS_YAML, TINY_RESNET, run_cli
from tftransfer import workdir
from tftransfer.backbones import load_backbone
from tftransfer.data import cache as cache_lib
from tftransfer.data import load_image_folder, make_pipeline
from tftransfer.heads import HeadSpec


def _image_folder(root, per_class=30, size=40, seed=0, alpha=False):
    """root/<a|b>/*.png: random 8-bit RGB images (some RGBA with partial alpha)."""
    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            channels = 4 if alpha and i % 3 == 0 else 3
            pixels = rng.integers(0, 256, (size, size + i % 5, channels), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def converter():
    return load_backbone(spec=dict(TINY_RESNET), image_size=32).preprocessor


HEADS = [HeadSpec(name="label", type="classification", num_classes=2)]


def _batches(split, converter, cache, **kwargs):
    ds = make_pipeline(split, converter, "image", HEADS, 8, cache=cache, **kwargs)
    return [(x, y["label"]) for x, y in ds.as_numpy_iterator()]


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == np.float32
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_cached_batches_equal_uncached_bit_for_bit(tmp_path, converter):
    # 8-bit images (cached as uint8 source pixels) and partly transparent
    # ones (not whole numbers after compositing: cached as float32).
    data = load_image_folder(_image_folder(str(tmp_path / "img"), per_class=6, alpha=True))
    uncached = _batches(data.train, converter, False)
    _same(uncached, _batches(data.train, converter, "memory"))
    disk = str(tmp_path / "cache")
    _same(uncached, _batches(data.train, converter, "disk", cache_dir=disk))
    assert glob.glob(os.path.join(disk, "train-*", "cache.index"))
    _same(uncached, _batches(data.train, converter, "disk", cache_dir=disk))  # read back from disk


def test_images_are_cached_as_uint8(tmp_path, converter):
    data = load_image_folder(_image_folder(str(tmp_path / "img"), per_class=4, size=32))
    stored = cache_lib.cached(data.train.dataset, converter, "image", "memory")
    # What the cache holds: the element spec of the dataset `cache()` wraps.
    cache_input = stored._input_dataset._input_dataset
    pixels, output = cache_input.element_spec[0]
    assert pixels.dtype == tf.uint8
    for (u8, f), _ in cache_input.as_numpy_iterator():
        assert u8.size > 0 and f.size == 0


def test_stale_disk_cache_is_not_reused(tmp_path, converter):
    root = _image_folder(str(tmp_path / "img"), per_class=4)
    disk = str(tmp_path / "cache")
    before = _batches(load_image_folder(root).train, converter, "disk", cache_dir=disk)
    [old] = glob.glob(os.path.join(disk, "train-*"))
    # Same file names, new contents.
    _image_folder(root, per_class=4, seed=1)
    data = load_image_folder(root)
    after = _batches(data.train, converter, "disk", cache_dir=disk)
    _same(_batches(data.train, converter, False), after)
    assert not np.array_equal(before[0][0], after[0][0])
    [new] = glob.glob(os.path.join(disk, "train-*"))
    assert new != old  # the stale cache was removed, not read


def test_stale_key_changes_with_preprocessing(tmp_path, converter):
    data = load_image_folder(_image_folder(str(tmp_path / "img"), per_class=2))
    other = load_backbone(spec=dict(TINY_RESNET), image_size=24).preprocessor
    ds = data.train.dataset
    assert cache_lib.key(ds, converter, "image", data.train) == cache_lib.key(ds, converter, "image", data.train)
    assert cache_lib.key(ds, converter, "image", data.train) != cache_lib.key(ds, other, "image", data.train)


def test_leftovers_of_a_killed_run_do_not_break_a_rerun(tmp_path, converter):
    data = load_image_folder(_image_folder(str(tmp_path / "img"), per_class=4))
    disk = str(tmp_path / "cache")
    digest = cache_lib.key(data.train.dataset, converter, "image", data.train)
    folder = os.path.join(disk, f"train-{digest}")
    os.makedirs(folder)
    # What a SIGKILL mid-write leaves: TF's lockfile and a partial shard.
    for leftover in ("cache_0.lockfile", "cache_0.data-00000-of-00001.tempstate123"):
        open(os.path.join(folder, leftover), "w").write("x")
    _same(_batches(data.train, converter, False), _batches(data.train, converter, "disk", cache_dir=disk))
    assert os.path.exists(os.path.join(folder, "cache.index"))
    assert not glob.glob(os.path.join(folder, "*lockfile*"))


def test_auto_chooses_by_budget():
    assert cache_lib.plan("auto", 10 * 2**20, budget_mb=100, directory="d").mode == "memory"
    big = cache_lib.plan("auto", 200 * 2**20, budget_mb=100, directory="d")
    assert (big.mode, big.summary()["estimated_mb"]) == ("disk", 200.0)
    assert cache_lib.plan("auto", 200 * 2**20, budget_mb=100).mode == "false"  # no directory
    assert cache_lib.plan(True, 0).mode == "memory" and cache_lib.plan(False, 0).mode == "false"


def test_estimate_is_examples_times_preprocessed_bytes(tmp_path, converter):
    data = load_image_folder(_image_folder(str(tmp_path / "img"), per_class=3))
    assert cache_lib.estimate_bytes(data.train, converter, "image") == 6 * (32 * 32 * 3 * 4 + 4)


def test_bogus_cache_setting_is_a_one_line_config_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(TINY_DIGITS_YAML)
    result = run_cli("tftransfer.train", f"--config={config}", f"--workdir={tmp_path / 'w'}",
                     "--config.data.cache=bogus")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "data.cache must be one of auto, memory, disk, false" in lines[0], lines
    assert "bogus" in lines[0]


def test_train_over_budget_caches_on_disk(tmp_path):
    root = _image_folder(str(tmp_path / "img"), per_class=30, size=40)
    config = tmp_path / "c.yaml"
    config.write_text(f"""
name: disk_cache
backbone:
  spec: {json.dumps(TINY_RESNET)}
  image_size: 32
data:
  source: image_folder
  train_path: {root}
  validation_fraction: 0.2
  batch_size: 16
  cache_memory_budget_mb: 0.1
train: {{epochs: 1, optimizer: adam, verbose: 0}}
export: {{saved_model: false}}
""")
    W = tmp_path / "w"
    result = run_cli("tftransfer.train", f"--config={config}", f"--workdir={W}", "--verbosity=0")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((W / workdir.METRICS).read_text())
    cache = metrics["data_cache"]
    assert cache["mode"] == "disk" and cache["requested"] == "auto", cache
    assert cache["estimated_mb"] > cache["budget_mb"] == 0.1
    assert "data.cache=auto: disk" in result.stderr
    data_dir = W / workdir.DATA_CACHE
    assert glob.glob(str(data_dir / "train-*" / "cache.index")), os.listdir(data_dir)
    assert glob.glob(str(data_dir / "validation-*" / "cache.index")), os.listdir(data_dir)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_evaluation_cache_is_complete_before_any_consumer_reads_it(tmp_path, mode):
    # Validation is read by Keras' evaluate and by ValidationReport in the same
    # epoch; an iterator that starts on a partly written tf.data cache can read
    # a truncated split (validation metrics then came from 77, 217 or 237 of
    # 237 examples from run to run). The evaluation pipeline fills its cache in
    # one pass when it is built: the source is read exactly once, then never.
    reads = tf.Variable(0, dtype=tf.int64)

    def count(x, y):
        reads.assign_add(1)
        return x, y

    n = 12
    source = tf.data.Dataset.from_tensor_slices(
        (tf.reshape(tf.range(n * 3, dtype=tf.float32), (n, 3)), tf.range(n) % 2)).map(count)
    from tftransfer.data.sources import Split

    split = Split(source, n)
    heads = [HeadSpec(name="label", type="classification", num_classes=2)]
    ds = make_pipeline(split, lambda x: x, "text", heads, 5, cache=mode,
                       cache_dir=str(tmp_path / "cache"), cache_role="validation")
    assert int(reads.numpy()) == n  # filled while building
    partial = iter(ds)
    next(partial)  # a consumer that stops early, still alive
    assert sum(len(y["label"]) for _, y in ds) == n
    assert sum(len(y["label"]) for _, y in ds) == n
    assert int(reads.numpy()) == n  # every later pass read the cache
    train = make_pipeline(split, lambda x: x, "text", heads, 5, training=True, cache=mode,
                          cache_dir=str(tmp_path / "cache"), cache_role="train")
    assert int(reads.numpy()) == n  # training caches as it goes (its first epoch fills it)
    assert sum(len(y["label"]) for _, y in train) == n

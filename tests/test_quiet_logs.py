"""tftransfer.quiet_logs: default entrypoint stderr holds what a user needs, nothing of TF's start-up."""

import os
import re

from tftransfer import quiet_logs

from conftest import REPO, run_cli

CPP_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+\s+\S+\.cc:\d+\]", re.M)


def test_line_filter_hides_cpp_info_and_warnings_and_the_cuda_probe_only_without_a_driver():
    f = quiet_logs.LineFilter(has_gpu_driver=False)
    assert not f.keep(b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    assert not f.keep(b"I0000 00:00:1796347163.946973   25134 port.cc:153] oneDNN custom operations are on.")
    assert not f.keep(b"W0000 00:00:1796347179.728341   25475 local_rendezvous.cc:412] Local rendezvous is aborting")
    assert not f.keep(b"\t [[{{node MultiDeviceIteratorGetNextFromShard}}]]")  # continuation of the hidden line
    assert not f.keep(b"E0000 00:00:1796347168.113335   25134 cuda_platform.cc:52] failed call to cuInit: UNKNOWN")
    assert not f.keep(b"To enable the following instructions: AVX2 AVX512F, in other operations, rebuild TensorFlow")
    real_error = b"E0000 00:00:1796347168.113335   25134 some_kernel.cc:52] Out of memory while allocating"
    assert f.keep(real_error)
    assert f.keep(b"  indented text after a kept line")
    assert f.keep(b"error: data.train_path 'x.csv' does not exist.")
    assert f.keep(b"I1204 01:16:19.021716 140184479615872 train.py:81] tiny_digits: 60 train")  # absl Python: ours
    with_driver = quiet_logs.LineFilter(has_gpu_driver=True)
    assert with_driver.keep(b"E0000 00:00:1796347168.113335   25134 cuda_platform.cc:52] failed call to cuInit: X")


def test_verbose_requested_by_env_or_verbosity_flag():
    assert not quiet_logs.verbose_requested([], {})
    assert quiet_logs.verbose_requested([], {quiet_logs.ENV_VERBOSE: "1"})
    assert quiet_logs.verbose_requested(["--verbosity=1"], {})
    assert quiet_logs.verbose_requested(["--verbosity", "2"], {})
    assert not quiet_logs.verbose_requested(["--verbosity=0"], {})


def _default_env():
    """The environment a user has: no TF_CPP_MIN_LOG_LEVEL set by the test runner."""
    return {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet_logs.ENV_VERBOSE)}


def test_default_cpu_run_has_no_tensorflow_startup_lines(tmp_path):
    from conftest import TINY_DIGITS_YAML

    config = tmp_path / "c.yaml"
    config.write_text(TINY_DIGITS_YAML.replace("epochs: 2", "epochs: 1"))
    W = tmp_path / "w"
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tftransfer.train", f"--config={config}", f"--workdir={W}"],
                            capture_output=True, text=True, timeout=600, cwd=REPO, env=_default_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cuInit" not in result.stderr and not CPP_LINE.search(result.stderr), result.stderr[-3000:]
    assert "signature_serialization" not in result.stderr and "Assets written" not in result.stderr
    assert "tiny_digits: 60 train" in result.stderr  # our own log line stays
    assert "done in" in result.stdout
    # Asking for everything brings TensorFlow's lines back (here: the failing config, a quick run).
    verbose = run_cli("tftransfer.train", f"--config={tmp_path / 'missing.yaml'}", f"--workdir={W}2",
                      "--verbosity=1", env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    quiet = subprocess.run([sys.executable, "-m", "tftransfer.train", f"--config={tmp_path / 'missing.yaml'}",
                            f"--workdir={W}2"], capture_output=True, text=True, timeout=600, cwd=REPO,
                           env=_default_env())
    for r in (verbose, quiet):
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --config")
    assert not CPP_LINE.search(quiet.stderr)
    assert len(verbose.stderr.strip().splitlines()) > len(quiet.stderr.strip().splitlines())

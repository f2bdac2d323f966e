"""Run many bad-input cases of one entrypoint in one process (tests/test_bad_inputs.py).

    python tests/bad_inputs_runner.py cases.json results.json

`cases.json`: `{"module": "tftransfer.train", "cases": [{"name": ..., "argv": [...]}, ...]}`.
Each case goes through the entrypoint exactly as `python -m <module> argv`
does — `cli.run(main)`: absl flag parsing, `--config.*` overrides, the
`UserError` -> one line + exit 2 contract — with the flags reset between
cases. Only the process is shared, so TensorFlow starts once, not once per
case. For each case the result holds the exit code, what it wrote to
`sys.stderr`, and the traceback of any other exception (a bug).
"""

import contextlib
import importlib
import io
import json
import os
import sys
import traceback

os.environ["TFTRANSFER_VERBOSE_LOGS"] = "1"  # no fd-2 filter: stderr is captured per case below


def run_case(module, argv):
    from absl import flags

    from tftransfer import cli

    flags.FLAGS.unparse_flags()
    sys.argv = [module] + list(argv)
    err = io.StringIO()
    code, crash = 0, None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.run(module_main(module))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # a bug: what the user would see as a traceback
            code, crash = 1, traceback.format_exc()
    _reset_keras()
    return {"code": code, "stderr": err.getvalue(), "traceback": crash}


def module_main(module):
    name = module if not module.endswith((".export", ".distill")) else module + ".__main__"
    return importlib.import_module(name).main


def _reset_keras():
    import keras

    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


def main():
    cases_path, results_path = sys.argv[1:3]  # run_case replaces sys.argv
    spec = json.load(open(cases_path))
    results = {c["name"]: run_case(spec["module"], c["argv"]) for c in spec["cases"]}
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

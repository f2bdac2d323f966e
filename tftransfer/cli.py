"""Shared plumbing of the absl entrypoints.

- `--config.a.b=value` dotted overrides are taken out of argv before absl
  parses it (absl cannot declare a flag per config key) and applied to the
  YAML when it loads.
- A `UserError` (or a bad flag) prints one line, `error: ...`, on stderr and
  exits with code 2, with no traceback. Anything else is a bug and keeps its
  traceback (exit code 1).
"""

import sys

from absl import app, flags

from tftransfer.distribute import STRATEGIES
from tftransfer.errors import UserError

OVERRIDE_PREFIX = "--config."
FLAGS = flags.FLAGS
_overrides = []


def define_run_flags(config_help, workdir_help):
    """The flags every training-like entrypoint shares.

    `--config`, `--workdir` (required), `--strategy`, `--overwrite`. Call once,
    at import of the entrypoint module (one entrypoint per process).
    """
    flags.DEFINE_string("config", None, config_help)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.DEFINE_enum("strategy", None, list(STRATEGIES), "tf.distribute strategy; overrides distribute.strategy.")
    flags.DEFINE_bool("overwrite", False, "Start over in a work dir that holds a finished or unfinished run.")
    flags.mark_flags_as_required(["workdir"])


def load_run_config():
    """`--config` with the `--config.*` overrides and `--strategy` applied (nothing written)."""
    from tftransfer import config as config_lib

    overrides = config_overrides()
    if FLAGS.strategy:
        overrides.append(f"distribute.strategy={FLAGS.strategy}")
    return config_lib.load_config(FLAGS.config, overrides)


def start_run(cfg):
    """Build the strategy first, then claim `--workdir` for `cfg`; a `run_loop.Run`.

    The strategy comes before anything else touches TensorFlow's devices (a
    multi-worker strategy fails otherwise); a malformed `TF_CONFIG` is a
    `UserError` raised here, before anything is written. Then: refuse a
    finished run or a resume with a different config (see
    `tftransfer.workdir.check_can_start`; `--overwrite` clears the old run,
    on the chief), seed, op determinism, precision.
    """
    import os

    import keras

    from tftransfer import config as config_lib
    from tftransfer import distribute, run_loop, workdir
    from tftransfer.progress import keras_verbose

    d = cfg.distribute
    if d.logical_cpus:
        distribute.split_logical_cpus(d.logical_cpus)
    strategy, cluster = distribute.get_strategy(d.strategy, d.tpu)
    config_text = config_lib.dump_yaml(cfg)
    resuming = workdir.check_can_start(FLAGS.workdir, config_text, overwrite=FLAGS.overwrite)
    if FLAGS.overwrite and cluster.is_chief and os.path.isdir(FLAGS.workdir):
        workdir.clear(FLAGS.workdir)
    keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    distribute.set_precision(d.precision)
    return run_loop.Run(
        workdir=FLAGS.workdir, out=run_loop.make_out_dir(FLAGS.workdir, cluster), strategy=strategy,
        cluster=cluster, config_text=config_text, resuming=resuming,
        backup_every_steps=cfg.train.backup_every_steps, epochs=cfg.train.epochs,
        verbose=keras_verbose(cfg.train.verbose),
    )


def config_overrides():
    """The `a.b=value` overrides given on the command line, in order."""
    return list(_overrides)


def _parse_flags(argv):
    _overrides.clear()
    rest = []
    for arg in argv:
        if arg.startswith(OVERRIDE_PREFIX):
            _overrides.append(arg[len(OVERRIDE_PREFIX):])
        else:
            rest.append(arg)
    try:
        return flags.FLAGS(rest)
    except SystemExit:
        # absl exits 1 after printing --help/--helpfull; asking for help is not a failure.
        if any(a.split("=")[0] in ("--help", "--helpfull", "--helpshort", "-h") for a in rest):
            sys.exit(0)
        raise
    except flags.Error as e:
        print(f"error: {' '.join(str(e).split())} (see --helpfull)", file=sys.stderr)
        sys.exit(2)


def run(main):
    """`absl.app.run(main)` with quiet logs, overrides and the exit-code contract.

    Logs are set up first, before anything loads TensorFlow (see
    `tftransfer.quiet_logs`; `TFTRANSFER_VERBOSE_LOGS=1` or `--verbosity=1`
    shows everything).
    """
    from tftransfer import quiet_logs

    quiet_logs.install(sys.argv[1:])

    def guarded(argv):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded, flags_parser=_parse_flags)

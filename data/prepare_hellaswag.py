"""Download HellaSwag (Zellers et al. 2019, https://arxiv.org/abs/1905.07830) for the accuracy that
chapter 04's FineWeb runs report during training: 10,042 validation examples, ~11 MB of jsonl.

    uv run -m data.prepare_hellaswag                    # -> data/hellaswag/hellaswag_val.jsonl
    uv run -m data.prepare_hellaswag --split train --out data/hellaswag/hellaswag_train.jsonl

Needs internet once (raw.githubusercontent.com); offline, copy the file there by hand.
"""

import argparse

from nanomoe.interop.hellaswag import DEFAULT_PATH, URLS, HellaSwagError, download, load_examples

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--split", default="val", choices=sorted(URLS))
    p.add_argument("--out", default=None, help=f"output file (default: {DEFAULT_PATH.parent}/hellaswag_SPLIT.jsonl)")
    a = p.parse_args()
    try:
        path = download(a.split, a.out)
        print(f"{path}: {len(load_examples(path)):,} examples")
    except HellaSwagError as e:
        raise SystemExit(f"error: {e}") from None

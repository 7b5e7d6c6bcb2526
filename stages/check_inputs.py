"""check_inputs: validate all of params.yaml and list the files of ``data.root`` (runs on every ``dvc repro``).

Reads: the whole params file (every section, so a typo in any key stops any target with one line) and
the dataset folder. Writes ``<out>`` (``data/listing.json``): each file's path, size and mtime. It is
``always_changed`` in dvc.yaml, and ``prepare`` depends on its output, so a params edit never forces a
rerun by itself while a changed image folder reruns exactly ``prepare`` and what follows.
"""

from __future__ import annotations

import json

from unseg.cli import log, parser, run_stage, write_text
from unseg.data.listing import dataset_listing


def main(args, params) -> None:
    d = params.data
    listing = dataset_listing(d.dataset, d.root)
    write_text(args.out, json.dumps(listing, indent=0) + "\n")  # equal content, equal hash: prepare is skipped
    log("check_inputs", f"params valid; {len(listing['files'])} files under data.root")


if __name__ == "__main__":
    run_stage("check_inputs", main, parser(__doc__, "out"))

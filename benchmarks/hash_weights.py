"""How long the probe store's model identity takes on a checkpoint of a given size: the first run
hashes every weight file, a second run reads none (the hashes are remembered by path, size, mtime,
ctime and inode).

    python benchmarks/hash_weights.py [--mb 500] [--json benchmarks/results/hash_weights.json]

Writes a checkpoint-shaped folder (config.json, tokenizer.json, one model.safetensors of --mb MB of
random bytes) into a temporary folder, identifies it twice with a fresh hash cache, and prints the
two times, the bytes read each time, and the peak resident memory beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from provenance import provenance  # noqa: E402

from lmms_talo.memory import peak_resident_mb  # noqa: E402
from lmms_talo.outputs.model_identity import FileHasher, folder_digest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=500, help="size of the weight file (default 500 MB)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
        with open(folder / "model.safetensors", "wb") as handle:
            chunk = bytes(range(256)) * 4096  # 1 MiB
            for _ in range(args.mb):
                handle.write(chunk)
        runs, digests = [], []
        for attempt in ("first", "second"):
            hasher = FileHasher(Path(tmp) / "file_hashes.json")
            started = time.perf_counter()
            digests.append(folder_digest(folder, hasher))
            hasher.save()
            runs.append({"run": attempt, "seconds": time.perf_counter() - started, "bytes_read": hasher.bytes_read})
        if digests[0] != digests[1]:
            raise SystemExit("the two runs identified the checkpoint differently")
    peak_mb = peak_resident_mb()
    result = {"provenance": provenance(), "weight_file_mb": args.mb, "runs": runs, "peak_rss_mb": peak_mb}
    print("| run | seconds | bytes read | peak RSS MB |\n|---|---:|---:|---:|")
    for r in runs:
        print(f"| {r['run']} | {r['seconds']:.3f} | {r['bytes_read']} | {peak_mb:.0f} |")
    print(f"second / first: {runs[1]['seconds'] / runs[0]['seconds']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

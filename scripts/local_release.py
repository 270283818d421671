"""Publish SAEs as a sae_lens release in a local HuggingFace-hub cache, offline.

Takes SAE directories in sae_lens's format (``cfg.json`` + ``sae_weights.safetensors``, as
sage_nn trains them, e.g. ``$SAGE_NN_CACHE/saes/<model>/<set>/L23.resid_pre``), writes
them under ``ROOT/hf/hub/models--ORG--NAME/snapshots/<sha>/<hook name>/`` with
``refs/main``, registers the release in ``ROOT/registry.yaml`` (sae_lens's
``pretrained_saes.yaml`` format; SAE ids are the hook names) and prints the environment a
``sage run --sae RELEASE:ID_GLOB`` needs to load them through sae_lens's own
``SAE.from_pretrained`` with ``HF_HUB_OFFLINE=1``::

    python scripts/local_release.py ROOT SAE_DIR [SAE_DIR ...] --release smollm2-res-local
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("sae_dirs", type=Path, nargs="+")
    parser.add_argument("--release", default="local-release")
    parser.add_argument("--repo", default="local/saes")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    sha = hashlib.sha1("".join(sorted(map(str, args.sae_dirs))).encode()).hexdigest()
    repo = args.root / "hf" / "hub" / f"models--{args.repo.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    entries = []
    for sae_dir in args.sae_dirs:
        hook = json.loads((sae_dir / "cfg.json").read_text())["metadata"]["hook_name"]
        target = repo / "snapshots" / sha / hook
        target.mkdir(parents=True, exist_ok=True)
        for name in ("cfg.json", "sae_weights.safetensors"):
            shutil.copy(sae_dir / name, target / name)
        entries.append(f"    - {{id: {hook}, path: {hook}}}")
    (args.root / "registry.yaml").write_text(
        f"{args.release}:\n  repo_id: {args.repo}\n  model: {args.model}\n"
        "  conversion_func: null\n  saes:\n" + "\n".join(entries) + "\n")
    print(f"export HF_HUB_OFFLINE=1 HF_HUB_CACHE={args.root / 'hf' / 'hub'} "
          f"SAGE_NN_SAE_REGISTRY={args.root / 'registry.yaml'}")
    print(f"sage run --model {args.model} --sae '{args.release}:blocks.*' ...")


if __name__ == "__main__":
    main()

"""``scalelong-fid-stats`` / ``python scripts/make_fid_stats.py``: a data set's FID reference
statistics, composed as training composes the data set (usage: ``--help``)."""

from __future__ import annotations

import sys

from scalelong.utils.errors import ConfigError

OWN_KEYS = {"mode": "clean", "split": None, "num": None, "out": None, "inception": None, "device": None,
            "batch_size": "50", "kid_max": "5000", "workers": "1", "published": "false", "res": None}


USAGE = """Reference statistics for FID/KID: mean and covariance of a data set's Inception features.

    python scripts/make_fid_stats.py dataset=digits [mode=clean] [split=train] [num=N] [out=PATH]
    python scripts/make_fid_stats.py dataset=cifar10 published=true     # clean-fid's own file (needs a network)
    python scripts/make_fid_stats.py dataset=mscoco dataset.coco_dir=/data/coco   # val2014 at 256 px, streamed

Arguments are ``key=value`` like ``train.py``'s. The data set is composed from ``conf/`` exactly
as training composes it (``dataset=NAME`` and any ``dataset.KEY=VALUE`` overrides), so the
statistics see the images training sees, at the same resolution. Keys of this script:

    mode=clean|legacy_pytorch   Inception and resize (default clean)
    split=NAME                  the split (default: the data set's fid.reference_split, else train)
    num=N                       only N images (a fixed random subset; saved as ..._nN.npz)
    out=PATH                    the file to write (default <cache>/fid_stats/{dataset}_{mode}_{split}_{res}.npz)
    inception=PATH              Inception weights (default: see scalelong.metrics.inception)
    device=cpu|cuda             where Inception runs (default cuda if available)
    batch_size=50, kid_max=5000, workers=1
    published=true              fetch clean-fid's published statistics instead (cifar10 only)

Writes the ``.npz`` (mu, sigma, num, kid_feats, meta) and a ``.json`` beside it with the file's
sha1, both atomically, and prints the path.
"""


def parse(argv: list[str]) -> tuple[dict[str, str | None], list[str]]:
    own, overrides = dict(OWN_KEYS), []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"error: arguments are key=value, got {arg!r}")
        if key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides


def compose_dataset(overrides: list[str]) -> dict:
    """The ``dataset`` node as ``python train.py <overrides>`` composes it."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from scalelong.config import compose

    try:
        cfg = compose(overrides)
    except HydraException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    return OmegaConf.to_container(cfg.dataset, resolve=True)


def main(argv: list[str] | None = None) -> int:
    own, overrides = parse(sys.argv[1:] if argv is None else argv)
    from scalelong.cli import fail

    try:
        if own["published"].lower() in ("1", "true", "yes"):
            from scalelong.metrics.reference import convert_published

            name = next((o.split("=", 1)[1] for o in overrides if o.startswith("dataset=")), None)
            if name is None:
                raise ConfigError("published=true needs dataset=NAME")
            path = convert_published(name, own["mode"], own["split"] or "train",
                                     int(own["res"]) if own["res"] else None, own["out"])
            print(f"clean-fid's published statistics -> {path}")
            return 0
        import torch

        from scalelong.metrics.inception import load_inception
        from scalelong.metrics.reference import check_split, make_reference_stats

        dataset_cfg = compose_dataset(overrides)
        own["split"] = own["split"] or (dataset_cfg.get("fid") or {}).get("reference_split", "train")
        check_split(dataset_cfg, own["split"])  # before the weights are loaded
        device = own["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
        extractor = load_inception(own["mode"], own["inception"], device)
        print(extractor.weights.describe(), flush=True)
        path, stats = make_reference_stats(dataset_cfg, extractor, own["split"], own["out"],
                                           int(own["num"]) if own["num"] else None, int(own["batch_size"]),
                                           int(own["kid_max"]), int(own["workers"]), progress=True)
    except ConfigError as err:
        fail(str(err))
    except ValueError as err:  # a non-integer num, batch_size ...
        fail(f"bad argument: {err}")
    print(f"{stats.num} images of {dataset_cfg['name']} ({own['split']}) in {stats.meta['seconds']:.0f}s "
          f"-> {path} (sha1 {stats.sha1})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

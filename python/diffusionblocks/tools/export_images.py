"""The real images of an image dataset as the FID tools read them, to score a DiT run's
samples against (the run writes its own into RUN/fid-samples, see tasks/dit.py):

    python -m diffusionblocks.tools.export_images cifar10 --split test --out cifar10-test
    pip install pytorch-fid && python -m pytorch_fid RUN/fid-samples cifar10-test

The split's images go to OUT/NNNNN.png and OUT.npz (uint8 [N, H, W, C] as arr_0, labels),
the same layout as the samples. The dataset is found as training finds it: --data PATH,
else the cache, else a download (tasks/data/fetch.py)."""

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..tasks.data import images as image_data
from ..tasks.dit import write_for_fid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusionblocks.tools.export_images",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=[d for d in image_data.DATASETS if d != "digits"])
    parser.add_argument("--data", default="", help="the archive or folder (default: cache / download)")
    parser.add_argument("--split", choices=["train", "test"], default="test")
    parser.add_argument("--image-size", type=int, default=32, help="folder datasets: the size images are resized to")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        data = image_data.load(image_data.ImageDataOptions(dataset=args.dataset, data=args.data,
                                                           image_size=args.image_size))
    except ConfigError as error:
        print(f"error: {error}")
        return 2
    pixels, labels = getattr(data, f"{args.split}_images"), getattr(data, f"{args.split}_labels")
    folder = write_for_fid(data.pixels(pixels), labels, Path(args.out))
    print(f"{len(labels)} images of the {data.name} {args.split} split in {folder}/ and {folder}.npz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

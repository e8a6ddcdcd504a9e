"""Make the Stable Diffusion 1.5 config's prompt file and FID reference folder from COCO 2014 val.

COCO's captions cannot ship with skiptune-search, so configs/sd15-dpmsolver-nfe20.toml reads two
files this script makes from COCO 2014 val (``val2014/`` and ``annotations/captions_val2014.json``
from cocodataset.org):

- ``coco-captions-1k.txt``: the first caption (lowest annotation id) of each of the 1,000 images
  with the lowest image ids, one per line (whitespace collapsed);
- ``coco-val2014-1k/``: those 1,000 images, center-cropped and resized to 512 x 512 (bicubic), as
  PNG files named by image id.

Run it with ``annotations/`` and ``val2014/`` in the working directory; it writes both outputs
there (needs Pillow)::

    python configs/coco_prepare.py
"""

import json, os
from PIL import Image

coco = json.load(open("annotations/captions_val2014.json"))
first = {}  # image id -> its caption with the lowest annotation id
for a in sorted(coco["annotations"], key=lambda a: a["id"]):
    first.setdefault(a["image_id"], " ".join(a["caption"].split()))
ids = sorted(first)[:1000]  # the 1,000 val images with the lowest ids
open("coco-captions-1k.txt", "w").write("".join(first[i] + "\n" for i in ids))
files = {im["id"]: im["file_name"] for im in coco["images"]}
os.makedirs("coco-val2014-1k", exist_ok=True)
for i in ids:  # the reference: the same images, center-cropped and resized to 512 x 512
    im = Image.open(f"val2014/{files[i]}").convert("RGB")
    s = min(im.size)
    box = ((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2)
    im.crop(box).resize((512, 512), Image.BICUBIC).save(f"coco-val2014-1k/{i:012d}.png")

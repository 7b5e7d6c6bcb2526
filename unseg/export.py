"""``unseg export``: the trained DeepLab as a file other runtimes load, without unseg.

    unseg export artifacts/deeplab/model.pt -o deeplab.pt2              # torch.export: torch.export.load(f).module()
    unseg export artifacts/deeplab/model.pt -o deeplab.onnx --format onnx  # needs the onnx package

Both take the bundle's network input: (B, 3, S, S) float RGB in [0, 1] at S = its ``preprocess.input_size``
(ImageNet normalisation is inside), and give (B, C, S, S) logits; upsample them to the image and take the
argmax (``unseg.models.bundle.Preprocess`` says the rest). The torch.export program has batch 1; the ONNX graph
a dynamic batch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from unseg.errors import UserError
from unseg.models.bundle import Preprocess, read_bundle
from unseg.models.loading import build_from_bundle

FORMATS = ("torch", "onnx")


def export_deeplab(model_path: Path, out: Path, fmt: str = "torch") -> Path:
    """Write the DeepLab of bundle ``model_path`` to ``out`` as a torch.export program or an ONNX graph."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    bundle = read_bundle(model_path, "deeplab")
    prep = Preprocess(**bundle["preprocess"])
    if prep.input_size is None:
        raise UserError(f"{model_path}: its DeepLab takes images at their own size; export needs a fixed input_size")
    model = build_from_bundle(bundle)
    example = torch.rand(1, 3, prep.input_size, prep.input_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with torch.no_grad():
        if fmt == "torch":
            torch.export.save(torch.export.export(model, (example,)), tmp)
        else:
            if importlib.util.find_spec("onnx") is None:
                raise UserError("--format onnx needs the onnx package: pip install onnx")
            torch.onnx.export(
                model,
                (example,),
                tmp,
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            )
    tmp.replace(out)
    return out


def add_arguments(ap) -> None:
    ap.add_argument("model", type=Path, help="a DeepLab model.pt bundle (artifacts/deeplab/model.pt)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="file to write (.pt2 or .onnx)")
    ap.add_argument("--format", choices=FORMATS, default="torch")


def run(args) -> None:
    path = export_deeplab(args.model, args.out, args.format)
    print(f"unseg export: {args.model} -> {path} ({args.format})")

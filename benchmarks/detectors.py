"""The pip-installed detectors, built by their packages' own code (random weights), routed by
``dnops.compat.use_dnops`` against the package's own: ultralytics' RT-DETR-L at 640 px and Roboflow's RF-DETR Nano at
its default 384 px, batch 2, float32. Per package: the decoder's forward + backward (ultralytics' RTDETRDecoder on the
backbone's features; rfdetr's transformer, its two-stage proposals and decoder), the whole training step (forward, the
package's own loss, backward, AdamW) and the denoising group (ultralytics' get_cdn_group; RF-DETR trains without
one). The quick run (``make test``'s smoke run) takes one small image per package."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator

import torch

import dnops.compat
from benchmarks.suites import Bench, Target

CLASSES = 80


def _gt(batch: int, per_image: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    k = batch * per_image
    centre, size = torch.rand(k, 2, generator=g) * 0.6 + 0.2, torch.rand(k, 2, generator=g) * 0.2 + 0.05
    return torch.randint(0, CLASSES, (k,), generator=g), torch.cat([centre, size], 1).to(dtype)


def _flat_batch(batch: int, per_image: int, device: torch.device) -> dict:
    """ultralytics' flat GT batch (what RTDETRDetectionModel.loss hands its decoder): batch images of per_image GT."""
    labels, boxes = _gt(batch, per_image)
    return {
        "cls": labels.to(device),
        "bboxes": boxes.to(device),
        "batch_idx": torch.arange(batch).repeat_interleave(per_image).to(device),
        "gt_groups": [per_image] * batch,
    }


def _step(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[int], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def run(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return run


def _backward(out: object) -> None:
    tensors = [t for t in (out if isinstance(out, list | tuple) else [out]) if isinstance(t, torch.Tensor)]
    sum(t.float().sum() for t in tensors if t.requires_grad).backward()


def ultralytics_benches(target: Target) -> Iterator[Bench]:
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="dnops-yolo-"))
    from ultralytics.models.utils import ops as ul_ops
    from ultralytics.nn.tasks import RTDETRDetectionModel

    size, batch, per_image = (128, 1, 4) if target.quick else (640, 2, 20)
    case = f"rtdetr-l {size}px"
    torch.manual_seed(0)
    original = RTDETRDetectionModel("rtdetr-l.yaml", nc=CLASSES, verbose=False).to(target.device).train()
    original.nc = CLASSES
    routed = copy.deepcopy(original)
    dnops.compat.use_dnops(routed)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(target.device)
    flat = _flat_batch(batch, per_image, target.device)
    loss_batch = {"img": images, "cls": flat["cls"][:, None].float(), "bboxes": flat["bboxes"]}
    loss_batch["batch_idx"] = flat["batch_idx"].float()

    features = {}  # the head's inputs: the backbone and encoder's feature maps
    head = original.model[-1]
    hook = head.register_forward_pre_hook(lambda m, args: features.setdefault("x", [t.detach() for t in args[0]]))
    with torch.no_grad():
        original.predict(images, batch=flat)
    hook.remove()

    reps = 0 if target.quick else 7
    decoder = Bench("ultralytics", case, f"B={batch} decoder fwd+bwd", "ultralytics", min_reps=reps)
    step = Bench("ultralytics", case, f"B={batch} train step fwd+bwd+opt", "ultralytics", min_reps=reps)
    for name, model in (("ultralytics", original), ("dnops", routed)):
        head = model.model[-1]
        decoder.impls[name] = lambda i, h=head: _backward(h(features["x"], flat)[:2])
        step.impls[name] = _step(model, lambda m=model: m.loss(loss_batch)[0])
    yield decoder
    yield step

    package = getattr(ul_ops.get_cdn_group, "__wrapped__", ul_ops.get_cdn_group)
    embed = routed.model[-1].denoising_class_embed.weight
    for b, n in ((batch, per_image),) if target.quick else ((2, 20), (16, 30)):
        group = _flat_batch(b, n, target.device)
        bench = Bench("ultralytics", f"B={b} {n} GT", "get_cdn_group", "ultralytics", count_ops=True)
        args = (group, CLASSES, 300, embed, 100, 0.5, 1.0, True)
        bench.impls["ultralytics"] = lambda i, a=args: package(*a)
        bench.impls["dnops"] = lambda i, a=args: dnops.compat.ultralytics.get_cdn_group(*a)
        yield bench


def rfdetr_benches(target: Target) -> Iterator[Bench]:
    from rfdetr.config import RFDETRNanoConfig, TrainConfig
    from rfdetr.models import build_model_from_config
    from rfdetr.models.lwdetr import build_criterion_from_config

    logging.getLogger("rf-detr").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_config = RFDETRNanoConfig(pretrain_weights=None, device=target.device.type)
        train_config = TrainConfig(dataset_dir=".", output_dir=".")
    size, batch, per_image = (128, 1, 4) if target.quick else (model_config.resolution, 2, 20)
    case = f"nano {size}px"
    torch.manual_seed(0)
    original = build_model_from_config(model_config, train_config).to(target.device).train()
    routed = copy.deepcopy(original)
    dnops.compat.use_dnops(routed)
    criterion, _ = build_criterion_from_config(model_config, train_config)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(target.device)
    labels, boxes = _gt(batch, per_image)
    targets = [
        {"labels": labels[i * per_image : (i + 1) * per_image], "boxes": boxes[i * per_image : (i + 1) * per_image]}
        for i in range(batch)
    ]
    targets = [{k: v.to(target.device) for k, v in t.items()} for t in targets]

    captured = {}  # the transformer's inputs: the backbone's features, masks, positions, query parameters
    hook = original.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: captured.setdefault("args", (args, kwargs)), with_kwargs=True
    )
    with torch.no_grad():
        original(images, targets)
    hook.remove()
    args, kwargs = captured["args"]

    def detached(x: object) -> object:
        if isinstance(x, torch.Tensor):
            return x.detach()
        if isinstance(x, list):
            return [detached(t) for t in x]
        return x

    args, kwargs = tuple(detached(a) for a in args), {k: detached(v) for k, v in kwargs.items()}

    def loss(model: torch.nn.Module) -> torch.Tensor:
        losses = criterion(model(images, targets), targets)
        return sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)

    reps = 0 if target.quick else 21  # its deformable attention is ~5% of these calls, the noise ~10% per call
    decoder = Bench("rfdetr", case, f"B={batch} transformer fwd+bwd", "rfdetr", min_reps=reps)
    step = Bench("rfdetr", case, f"B={batch} train step fwd+bwd+opt", "rfdetr", min_reps=reps)
    for name, model in (("rfdetr", original), ("dnops", routed)):
        decoder.impls[name] = lambda i, m=model: _backward(m.transformer(*args, **kwargs)[:2])
        step.impls[name] = _step(model, lambda m=model: loss(m))
    yield decoder
    yield step


def installed(package: str, benches: Callable[[Target], Iterator[Bench]], target: Target) -> Iterator[Bench]:
    """``benches(target)`` where ``package`` is installed (requirements-detectors.txt); else one row saying it is
    not."""
    if importlib.util.find_spec(package) is None:
        bench = Bench(package, "-", "-", package)
        bench.impls[package] = f"skipped: {package} is not installed (requirements-detectors.txt)"
        yield bench
        return
    yield from benches(target)

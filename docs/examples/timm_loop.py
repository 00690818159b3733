"""timm's training-loop style, distilling from a kdpipe cache.

    python docs/examples/timm_loop.py --cache runs/teacher-T4.zarr --data synthetic

The shape of timm's ``train.py`` (``train_one_epoch`` and ``validate``: optimizer and
scheduler from timm's factories, ``step_update`` after every step and ``step`` after
every epoch, ``AverageMeter`` and ``timm.utils.accuracy``), with kdpipe's dataset and
loss in place of timm's loader and criterion. timm's ``train.py`` itself cannot be
pointed at a cache: its ``create_loader`` builds its own transforms and augmentation
from the images, and its criterion takes ``(output, target)`` only, with no place for
the soft target of the stored view each sample was shown as.
"""

from __future__ import annotations

import argparse

import kdpipe as kd
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, accuracy


def train_one_epoch(epoch, model, loader, updates_per_epoch, optimizer, scheduler, alpha,
                    temperature) -> dict:  # fmt: skip
    model.train()
    losses, hard, soft = AverageMeter(), AverageMeter(), AverageMeter()
    num_updates = (epoch - 1) * updates_per_epoch
    for images, labels, soft_targets, *mixed in loader:
        partner_labels, lam = mixed if mixed else (None, None)  # a mixup or cutmix cache
        logits = model(images)
        terms = kd.distillation_loss(
            logits,
            labels,
            soft_targets,
            alpha=alpha,
            temperature=temperature,
            partner_labels=partner_labels,
            lam=lam,
        )
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        num_updates += 1
        scheduler.step_update(num_updates=num_updates)
        losses.update(terms["loss"].item(), images.size(0))
        hard.update(terms["hard"].item(), images.size(0))
        soft.update(terms["soft"].item(), images.size(0))
    return {"loss": losses.avg, "hard_loss": hard.avg, "soft_loss": soft.avg}


@torch.no_grad()
def validate(model, test_set: kd.ImageSet, data_config: kd.DataConfig) -> dict:
    model.eval()
    top1 = AverageMeter()
    for start in range(0, len(test_set), 256):
        images = test_set.images[start : start + 256]
        labels = test_set.labels[start : start + 256]
        logits = model(data_config.normalize(images.float() / 255.0))
        top1.update(accuracy(logits, labels, topk=(1,))[0].item(), images.size(0))
    return {"top1": top1.avg}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--model", default="kd_mlp_30x2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--opt", default="adamw")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--sched", default="cosine")
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cache = kd.open_cache(args.cache)
    # decoded as the cache's data was (a folder's size and resize, from its manifest)
    split = cache.manifest.dataset["split"]
    source = kd.load_dataset(args.data, split, data_root=args.data_root, **cache.decode)
    dataset = kd.DistillationDataset(source, cache, seed=args.seed)
    test_set = kd.load_dataset(args.data, "test", data_root=args.data_root, **cache.decode)
    torch.manual_seed(args.seed)
    model = kd.create_model(
        args.model, num_classes=cache.num_classes, data_config=dataset.data_config
    )
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    # whole batches by train-student's path (in place of timm's create_loader)
    shuffle = torch.Generator().manual_seed(args.seed)
    updates_per_epoch = -(-len(dataset) // args.batch_size)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.lr * 0.01,
        step_on_epochs=True,
        updates_per_epoch=updates_per_epoch,
    )
    top1 = float("nan")
    for epoch in range(1, num_epochs + 1):
        dataset.set_epoch(epoch)
        loader = dataset.batches(args.batch_size, generator=shuffle, workers=args.workers)
        train_metrics = train_one_epoch(epoch, model, loader, updates_per_epoch, optimizer,
                                        scheduler, args.alpha, dataset.temperature)  # fmt: skip
        top1 = validate(model, test_set, dataset.data_config)["top1"]
        scheduler.step(epoch, top1)
        print(
            f"epoch {epoch}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in train_metrics.items())
            + f", top1 {top1:.2f}"
        )
    return top1 / 100


if __name__ == "__main__":
    main()

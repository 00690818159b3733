"""A plain PyTorch loop that distills from a kdpipe cache.

    python docs/examples/plain_loop.py --cache runs/teacher-T4.zarr --data synthetic

The data is kdpipe's own (``load_dataset``: an image folder is decoded a batch at a time,
never held whole), and the batches come from ``DistillationDataset.batches``, the path
``train-student`` takes. Any indexable dataset of ``(image, label)`` with uint8 or PIL
images works in place of it (torchvision's FashionMNIST without a transform, for one), as
long as it is the data the cache was made from, in the same order: the dataset checks.
"""

from __future__ import annotations

import argparse

import kdpipe as kd
import torch


def test_accuracy(
    model: torch.nn.Module, test_set: kd.ImageSet, data_config: kd.DataConfig
) -> float:
    """Accuracy on the plain test images, normalised as the training inputs are."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_set), 256):  # a folder decodes these rows only
            images = test_set.images[start : start + 256]
            inputs = data_config.normalize(images.float() / 255.0)
            correct += int((model(inputs).argmax(-1) == test_set.labels[start : start + 256]).sum())
    return correct / len(test_set)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a cache written by cache-teacher")
    parser.add_argument("--data", default="synthetic", help="fashion-mnist, synthetic, a folder")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--model", default="kd_mlp_30x2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="processes decoding a folder")
    args = parser.parse_args(argv)

    cache = kd.open_cache(args.cache)
    split = cache.manifest.dataset["split"]
    # decoded as the cache's data was (a folder's size and resize, from its manifest)
    images = kd.load_dataset(args.data, split, data_root=args.data_root, **cache.decode)
    dataset = kd.DistillationDataset(images, cache, seed=args.seed)  # refuses other data
    test_set = kd.load_dataset(args.data, "test", data_root=args.data_root, **cache.decode)

    torch.manual_seed(args.seed)
    model = kd.create_model(
        args.model, num_classes=cache.num_classes, data_config=dataset.data_config
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    shuffle = torch.Generator().manual_seed(args.seed)
    accuracy = float("nan")
    for epoch in range(1, args.epochs + 1):
        dataset.set_epoch(epoch)  # this epoch's stored view of every row
        model.train()
        batches = dataset.batches(args.batch_size, generator=shuffle, workers=args.workers)
        for images_in, labels, soft_targets in batches:  # (mixup caches add two fields)
            logits = model(images_in)
            terms = kd.distillation_loss(
                logits, labels, soft_targets, alpha=args.alpha, temperature=dataset.temperature
            )
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
        accuracy = test_accuracy(model, test_set, dataset.data_config)
        print(f"epoch {epoch}: loss {terms['loss'].item():.4f}, test accuracy {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()

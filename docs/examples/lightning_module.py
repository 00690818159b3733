"""A Lightning module that distills from a kdpipe cache (``pip install 'kdpipe[lightning]'``).

    python docs/examples/lightning_module.py --cache runs/teacher-T4.zarr --data synthetic

The module's ``training_step`` is kdpipe's loss on ``DistillationDataset`` batches; the
stored view of each row follows the epoch through ``set_epoch`` at the start of every
training epoch (Lightning counts epochs from 0, kdpipe's schedule from 1).
"""

from __future__ import annotations

import argparse

import kdpipe as kd
import lightning
import torch


class Distillation(lightning.LightningModule):
    def __init__(self, model: torch.nn.Module, dataset: kd.DistillationDataset, alpha: float,
                 lr: float, batch_size: int, test_set: kd.ImageSet) -> None:  # fmt: skip
        super().__init__()
        self.model, self.dataset, self.test_set = model, dataset, test_set
        self.alpha, self.lr, self.batch_size = alpha, lr, batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)

    def on_train_epoch_start(self) -> None:
        self.dataset.set_epoch(self.current_epoch + 1)

    def training_step(self, batch: list[torch.Tensor], batch_index: int) -> torch.Tensor:
        images, labels, soft_targets, *mixed = batch
        terms = kd.distillation_loss(
            self.model(images), labels, soft_targets, alpha=self.alpha,
            temperature=self.dataset.temperature,
            partner_labels=mixed[0] if mixed else None, lam=mixed[1] if mixed else None,
        )  # fmt: skip
        self.log_dict(
            {"loss": terms["loss"], "hard_loss": terms["hard"], "soft_loss": terms["soft"]}
        )
        return terms["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)

    @torch.no_grad()
    def test_accuracy(self) -> float:
        self.model.eval()
        inputs = self.dataset.data_config.normalize(self.test_set.images.float() / 255.0)
        return float((self.model(inputs).argmax(-1) == self.test_set.labels).float().mean())


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--model", default="kd_mlp_30x2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    lightning.seed_everything(args.seed, verbose=False)
    cache = kd.open_cache(args.cache)
    source = kd.load_dataset(args.data, cache.manifest.dataset["split"], data_root=args.data_root)
    dataset = kd.DistillationDataset(
        torch.utils.data.TensorDataset(source.images, source.labels), cache, seed=args.seed
    )
    model = kd.create_model(args.model, num_classes=cache.num_classes,
                            data_config=dataset.data_config)  # fmt: skip
    module = Distillation(model, dataset, args.alpha, args.lr, args.batch_size,
                          kd.load_dataset(args.data, "test", data_root=args.data_root))  # fmt: skip
    trainer = lightning.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1,
                                logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module)
    accuracy = module.test_accuracy()
    print(f"test accuracy after {args.epochs} epochs: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
